"""The access log: one record per closed socket and failed connect.

records.py   kernel record + identities -> AccessRecord, handed to the sinks in budget
render.py    AccessRecord -> JSON object, the seed's text line, journal fields (pure)
sinks.py     where records go: a JSON-lines file, journald (IO, drops counted)
query.py     `kmeshd accesslog`: the records read back from journald
"""
