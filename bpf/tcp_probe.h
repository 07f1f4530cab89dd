/* Records shared by bpf/tcp_probe.c and kmeshd/events.py.
 *
 * Every field is fixed-size and naturally aligned, so the Python ctypes mirrors in
 * kmeshd/events.py see the same layout; tests compare ctypes.sizeof() with the sizes
 * asserted here. Bump KMESHD_LAYOUT when any of these change: the pinned maps live
 * under <pin_dir>/v<KMESHD_LAYOUT>, so a daemon never reads maps of another layout.
 */
#ifndef KMESHD_TCP_PROBE_H
#define KMESHD_TCP_PROBE_H

#define KMESHD_LAYOUT 3

#define DIR_OUTBOUND 1 /* this socket called connect(): the client */
#define DIR_INBOUND 2  /* this socket was accepted: the server */

#define KIND_CLOSED 1
#define KIND_FAILED 2

#define REASON_NONE 0
#define REASON_REFUSED 1 /* a RST answered the SYN */
#define REASON_TIMEOUT 2 /* the SYN (or later data) retransmission timer expired */
#define REASON_OTHER 3

#define RECORD_RESET 1 /* flag: a RST was received before the close */

/* Per-CPU counters of what the probe saw and what it could not record. */
#define STAT_OPENED 0
#define STAT_CLOSED 1
#define STAT_FAILED 2
#define STAT_UNATTRIBUTED 3   /* connections (and attempts) with neither end in known_addrs */
#define STAT_RINGBUF_LOST 4   /* access-log records the ring buffer could not take */
#define STAT_FLOWS_FULL 5     /* flow updates refused: the flows map was full */
#define STAT_SOCKS_FULL 6     /* sockets not tracked: the socks map was full */
#define STAT_COUNT 7

/* IPv4 addresses are stored v4-mapped (::ffff:a.b.c.d) so both families share a key. */
struct flow_key {
    __u8 client[16];
    __u8 server[16];
    __u16 server_port;
    __u8 direction;
    __u8 _pad;
};                                     /* 36 bytes */

/* Cumulative since the maps were created; bytes in Istio's terms (see INTERFACE.md). */
struct flow_counters {
    __u64 opened;
    __u64 closed;
    __u64 failed;
    __u64 received_bytes;  /* bytes the destination (server) received: the request direction */
    __u64 sent_bytes;      /* bytes the destination sent: the response direction */
};                                     /* 40 bytes */

/* One ring-buffer record per closed socket and per failed connect: the access log. */
struct conn_record {
    __u64 time_ns;         /* CLOCK_MONOTONIC at the close */
    __u64 duration_ns;     /* establishment (or connect, when failed) to close */
    __u64 received_bytes;  /* as in flow_counters */
    __u64 sent_bytes;
    __u8 local[16];
    __u8 remote[16];
    __u16 local_port;
    __u16 remote_port;
    __u8 kind;
    __u8 direction;
    __u8 reason;
    __u8 flags;
    __u32 srtt_us;         /* smoothed RTT in microseconds (the kernel keeps it << 3) */
    __u32 min_rtt_us;
    __u32 total_retrans;
    __u32 segs_in;
    __u32 segs_out;
    __u32 _pad;
};                                     /* 96 bytes */

_Static_assert(sizeof(struct flow_key) == 36, "flow_key size");
_Static_assert(sizeof(struct flow_counters) == 40, "flow_counters size");
_Static_assert(sizeof(struct conn_record) == 96, "conn_record size");

#endif
