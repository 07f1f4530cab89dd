"""kmeshd.identity.client: failures become messages that name the problem and the fix."""

from __future__ import annotations

import requests  # type: ignore[import-untyped,unused-ignore]

from kmeshd.identity.client import _transport_error


def test_the_same_failure_reads_the_same_every_time() -> None:
    """Object addresses are cut from transport errors, so a failing source's log line
    (written when the message changes) is not repeated at every retry."""
    exc = requests.exceptions.ConnectionError(
        "HTTPSConnectionPool(host='127.0.0.1', port=6443): Max retries exceeded (Caused by "
        "NewConnectionError('<urllib3.connection.HTTPSConnection object at 0x7f3a2c1d9e50>: "
        "Failed to establish a new connection: [Errno 111] Connection refused'))"
    )
    error = _transport_error(exc, "GET https://127.0.0.1:6443/api/v1/pods")
    assert str(error) == (
        "GET https://127.0.0.1:6443/api/v1/pods: cannot connect (HTTPSConnectionPool("
        "host='127.0.0.1', port=6443): Max retries exceeded (Caused by NewConnectionError("
        "'<urllib3.connection.HTTPSConnection>: Failed to establish a new connection: "
        "[Errno 111] Connection refused')))"
    )


def test_a_certificate_problem_points_at_the_ca() -> None:
    error = _transport_error(requests.exceptions.SSLError("certificate verify failed"), "GET x")
    assert str(error) == (
        "GET x: TLS failed (certificate verify failed): is the CA in the kubeconfig (or "
        "kubernetes.kubelet_ca_file) the one that signed the server's certificate?"
    )
