/* Everything bpf/tcp_probe.c and user space share: constants, and the structs of the maps
 * and of the ring buffer.
 *
 * kmeshd/kernel/layout.py mirrors this file, and tests/test_layout.py compiles it to
 * compare every #define and every field's offset and size with the mirror: change both
 * sides together. Every field is fixed-size and naturally aligned, with explicit padding.
 * Bump KMESHD_LAYOUT when a struct changes: the pinned maps live under
 * <pin_dir>/v<KMESHD_LAYOUT>, so a daemon never reads maps of another layout.
 */
#ifndef KMESHD_TCP_PROBE_H
#define KMESHD_TCP_PROBE_H

#define KMESHD_LAYOUT 8

/* ---- The stats and settings arrays --------------------------------------------------- */

/* Indexes of the per-CPU stats array: what the probe saw and what it could not record. */
#define STAT_OPENED 0
#define STAT_CLOSED 1
#define STAT_FAILED 2
#define STAT_UNATTRIBUTED 3   /* connections (and attempts) with neither end in known_addrs */
#define STAT_RINGBUF_LOST 4   /* access-log records the ring buffer could not take */
#define STAT_FLOWS_FULL 5     /* flow updates refused: the flows map was full */
#define STAT_SOCKS_FULL 6     /* sockets not tracked: the socks map was full */
#define STAT_SWEEP_BUSY 7     /* sweep visits that found the socket in use: at the next one */
#define STAT_COUNT 8

/* Indexes of the settings array, written by user space from the running daemon's config. */
#define SETTING_RECORDS 0  /* 1 while an access log wants records; off, a close costs no
                            * ring-buffer work at all */
#define SETTING_PERIODIC 1 /* ns between two records of one open connection; 0: none */
#define SETTING_GENERATION 2 /* the generation flows are counted in now (struct flow_key) */
#define SETTING_SWEEP_PASS 3 /* which sweep pass runs now (numbered by user space) */
#define SETTING_OPENED 4     /* 1 once a daemon opened this load's pins (user space only) */
#define SETTING_COUNT 5

/* ---- Flows: the key and counters of the flows map ------------------------------------ */

/* IPv4 addresses are stored v4-mapped (::ffff:a.b.c.d) so both families share a key.
 *
 * A flow is counted in one generation at a time: the program takes the generation from
 * the settings array at each update. User space starts a new one every bpf.flow_expiry,
 * waits until no program can still be writing the old one, reads its entries a last time
 * and deletes them, so the map holds only flows active lately and no count is lost or
 * doubled. In a socket's state and in unseen_closes the byte has other uses (see there). */
struct flow_key {
    __u8 client[16];
    __u8 server[16];
    __u16 server_port;
    __u8 direction;        /* DIR_* */
    __u8 generation;
};                                     /* 36 bytes */

#define DIR_OUTBOUND 1 /* this socket called connect(): the client */
#define DIR_INBOUND 2  /* this socket was accepted: the server */

/* Histogram bucket upper bounds, in microseconds, smallest first. Each histogram has one
 * more bucket, for values above the last bound. RTT and handshake: 50 µs (one rack) to
 * 10 s (SYN retransmitted three times). Connection duration: 0.5 ms to 4 h. */
#define LATENCY_BOUNDS_US(X) X(50) X(100) X(250) X(500) X(1000) X(2500) X(5000) X(10000) \
    X(25000) X(50000) X(100000) X(250000) X(500000) X(1000000) X(2500000) X(5000000) X(10000000)
#define DURATION_BOUNDS_US(X) X(500) X(1000) X(5000) X(10000) X(50000) X(100000) X(500000) \
    X(1000000) X(5000000) X(10000000) X(30000000) X(60000000) X(300000000) X(600000000) \
    X(1800000000) X(3600000000ULL) X(14400000000ULL)
#define BUCKETS 18

struct histogram {
    __u64 buckets[BUCKETS];  /* counts per bucket, not cumulative */
    __u64 sum_us;
};                                     /* 152 bytes */

/* Cumulative since the maps were created. Bytes in Istio's terms, for both reporters:
 * received by the destination (the request direction), sent by it (the response). */
struct flow_counters {
    __u64 opened;
    __u64 closed;
    __u64 failed;          /* connects that never established: refused + timeout + other */
    __u64 received_bytes;  /* bytes the destination (server) received: the request direction */
    __u64 sent_bytes;      /* bytes the destination sent: the response direction */
    __u64 reset;           /* established connections that ended on a RST received */
    __u64 refused;         /* failed: a RST answered the SYN */
    __u64 timeout;         /* failed: the SYN was never answered */
    __u64 retransmits;     /* segments this end retransmitted (total_retrans) */
    __u64 lost;            /* retransmissions not shown spurious by a D-SACK */
    struct histogram duration;  /* establishment to close */
    struct histogram srtt;      /* smoothed RTT at close */
    struct histogram min_rtt;   /* minimum RTT at close */
    struct histogram connect;   /* connect() to established, OUTBOUND only */
};                                     /* 688 bytes */

/* ---- Sockets: the value of the socks map --------------------------------------------- */

/* What the probe keeps of each tracked socket, keyed by socket cookie. User space reads it
 * when it sweeps out sockets that closed while no probe was attached. The flow key and the
 * client's port name both ends: a record needs nothing else of the socket. */
struct sock_state {
    struct flow_key key;    /* generation 0: flows are updated in the current one */
    __u16 flags;            /* SF_* */
    __u16 client_port;
    __u64 start_ns;         /* connect() for OUTBOUND, establishment for INBOUND */
    __u64 established_ns;
    __u64 reported_sent;    /* application bytes this socket sent, already in flows */
    __u64 reported_received;
    __u64 last_record_ns;   /* establishment, then each periodic record */
    __u64 reported_retrans; /* 64 bits for the compare-and-swap (see advance) */
    __u64 reported_lost;
    __u32 swept;            /* the last sweep pass that read it (SETTING_SWEEP_PASS) */
    __u32 swept_segs;       /* segs_in + segs_out when it was last read: unchanged, idle */
};                                     /* 104 bytes */

#define SF_ESTABLISHED 1 /* the handshake completed */
#define SF_RTO_EXPIRED 2 /* the retransmission timer gave up */
#define SF_RESET 4       /* a RST closed it (sk_err at the close, see closed_by_reset) */

/* ---- Records: the ring buffer's entries, the access log ------------------------------ */

/* One record per closed socket and per failed connect. */
struct conn_record {
    __u64 time_ns;         /* CLOCK_MONOTONIC at the close */
    __u64 duration_ns;     /* establishment (or connect, when failed) to close */
    __u64 received_bytes;  /* as in flow_counters */
    __u64 sent_bytes;
    __u8 local[16];
    __u8 remote[16];
    __u16 local_port;
    __u16 remote_port;
    __u8 kind;             /* KIND_* */
    __u8 direction;        /* DIR_* */
    __u8 reason;           /* REASON_*: why a connect failed */
    __u8 flags;            /* RECORD_* */
    __u32 srtt_us;         /* smoothed RTT in microseconds (the kernel keeps it << 3) */
    __u32 min_rtt_us;
    __u32 total_retrans;
    __u32 segs_in;
    __u32 segs_out;
    __u32 _pad;
};                                     /* 96 bytes */

#define KIND_CLOSED 1
#define KIND_FAILED 2
#define KIND_PROGRESS 3 /* a periodic record of an open connection (accesslog.periodic) */

#define REASON_NONE 0
#define REASON_REFUSED 1 /* a RST answered the SYN */
#define REASON_TIMEOUT 2 /* the SYN (or later data) retransmission timer expired */
#define REASON_OTHER 3

#define RECORD_RESET 1 /* a RST was received before the close */

_Static_assert(sizeof(struct flow_key) == 36, "flow_key size");
_Static_assert(sizeof(struct histogram) == 152, "histogram size");
_Static_assert(sizeof(struct flow_counters) == 688, "flow_counters size");
_Static_assert(sizeof(struct sock_state) == 104, "sock_state size");
_Static_assert(sizeof(struct conn_record) == 96, "conn_record size");

#endif
