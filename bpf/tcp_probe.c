/* kmeshd TCP probe: a sock_ops program on the cgroup v2 root, compiled by bcc at start-up,
 * and a TCP socket iterator that user space runs before each publish.
 *
 * Two outputs:
 *   flows   - cumulative per-flow counters (client, server, server port, direction):
 *             the source of every metric, exact whatever user space manages to read;
 *   records - one ring-buffer record per closed socket and per failed connect: the
 *             access log only. A record the ring cannot take is counted, never silent.
 *
 * The kernel headers bcc compiles against need not match the running kernel (README, "How
 * it works"), so the sock_ops program reads struct bpf_sock_ops context fields, whose
 * layout is stable, and two struct sock fields (sk_flags and sk_err, at close) at the
 * offsets kmeshd takes from the running kernel's BTF (kmeshd/kernel/btf.py);
 * the iterator reads a few struct tcp_sock fields the same way. Offsets arrive as *_OFF
 * defines, map sizes as *_MAX, the pin directory as PIN_DIR (kmeshd/kernel/build.py).
 *
 * Maps that must outlive a daemon restart are pinned under PIN_DIR, so a restarted daemon
 * neither resets nor double counts. Constants and structs shared with user space are in
 * tcp_probe.h.
 */
#include <uapi/linux/bpf.h>
#include <linux/bpf.h>
#include <linux/socket.h>
#include <uapi/asm-generic/errno.h>
#include "tcp_probe.h"

/* ---- Maps ---------------------------------------------------------------------------- */

/* Per-flow counters, the source of every metric. Flows are few and long-lived: entries are
 * allocated when first used rather than all up front, at 688 bytes each. */
BPF_TABLE_PINNED("hash", struct flow_key, struct flow_counters, flows, FLOWS_MAX,
                 PIN_DIR "/flows", BPF_F_NO_PREALLOC);

/* A 16-byte address, IPv4 v4-mapped: the key of known_addrs. */
struct addr16 {
    __u8 a[16];
};

/* Workload addresses and service VIPs, written by user space: a connection with neither
 * end here is counted as unattributed and costs nothing more. */
BPF_TABLE_PINNED("hash", struct addr16, __u8, known_addrs, KNOWN_MAX, PIN_DIR "/known_addrs");

/* What the probe saw and could not record, per CPU, indexed by STAT_*. */
BPF_TABLE_PINNED("percpu_array", int, __u64, stats, STAT_COUNT, PIN_DIR "/stats");

/* Each tracked socket's state (struct sock_state), keyed by socket cookie. Not socket-local
 * storage: creating and deleting an entry there took 594 and 426 ns per socket, against
 * about 310 and 100 ns for this hash (kernel 6.18, README "Overhead"; about half the hash
 * insert is a cache miss on its bucket array). The price is that the kernel does not free
 * an entry by itself: the program deletes it at TCP_CLOSE, and kmeshd sweeps out entries
 * of sockets that closed while no program was attached (kmeshd/kernel/stale.py), counting
 * those closes. */
BPF_TABLE_PINNED("hash", __u64, struct sock_state, socks, SOCKS_MAX, PIN_DIR "/socks");

/* Closes of tracked sockets that happened while no probe was attached, found and counted
 * by user space's sweep (the program never writes it). An inbox: each sweep adds entries
 * of its own (the key's generation byte is a slot number, taken with BPF_NOEXIST), and the
 * daemon reads and deletes each once, so a sweep running beside the daemon is never lost
 * or counted twice. */
BPF_TABLE_PINNED("hash", struct flow_key, __u64, unseen_closes, FLOWS_MAX,
                 PIN_DIR "/unseen_closes", BPF_F_NO_PREALLOC);

/* One struct conn_record per closed socket and failed connect. */
BPF_RINGBUF_OUTPUT(records, RINGBUF_PAGES);

/* Indexed by SETTING_*: set by user space from the running daemon's config. Made anew at
 * each load (and pinned by `kmeshd load`, like the maps below it), so a new program starts
 * from defaults. */
BPF_ARRAY(settings, __u64, SETTING_COUNT);

/* Updated by user space only to wait for programs: an update of a map-in-map returns when
 * every program that was running has finished (the kernel's synchronize_rcu), so after a
 * generation switch and an update here, no program still writes the old generation. */
BPF_ARRAY(grace_inner, __u32, 1);
BPF_ARRAY_OF_MAPS(grace, "grace_inner", 1);

/* No program uses it: `kmeshd load` copies into it the flow keys the pinned flows map holds
 * before the new program attaches, for the daemon to read once (kmeshd/kernel/load.py). */
BPF_F_TABLE("hash", struct flow_key, __u8, kept, FLOWS_MAX, BPF_F_NO_PREALLOC);

/* A zeroed flow_counters to create flows from: too large for the BPF stack. */
BPF_ARRAY(zero_flow, struct flow_counters, 1);

/* ---- Counting and settings ----------------------------------------------------------- */

/* Atomic although the counter is this CPU's own: a connect() runs the program in process
 * context, where a softirq running it for another socket can interrupt between a load
 * and its store, and one of the two increments would be lost. */
static __always_inline void count(int index)
{
    __u64 *v = stats.lookup(&index);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline __u64 setting(int index)
{
    __u64 *v = settings.lookup(&index);
    return v ? *v : 0;
}

/* ---- Addresses and flows ------------------------------------------------------------- */

/* Both ends of a socket, as it sees them. */
struct tuple {
    struct addr16 local;
    struct addr16 remote;
    __u16 local_port;
    __u16 remote_port;
};

static __always_inline void v4_mapped(struct addr16 *out, __u32 ip4)
{
    __u32 *w = (__u32 *)out->a;
    w[0] = 0;
    w[1] = 0;
    w[2] = bpf_htonl(0xffff);
    w[3] = ip4;
}

/* Every address field is loaded unconditionally, each at its constant offset, and
 * pinned in a register: left to itself the compiler merges the IPv4 and IPv6 loads into
 * one load through a moved context pointer, which the verifier rejects. */
#define CTX_LOAD(var, field) \
    __u32 var = ctx->field; \
    asm volatile("" : "+r"(var))

static __always_inline void read_tuple(struct bpf_sock_ops *ctx, struct tuple *t)
{
    CTX_LOAD(l4, local_ip4);
    CTX_LOAD(r4, remote_ip4);
    CTX_LOAD(l0, local_ip6[0]);
    CTX_LOAD(l1, local_ip6[1]);
    CTX_LOAD(l2, local_ip6[2]);
    CTX_LOAD(l3, local_ip6[3]);
    CTX_LOAD(r0, remote_ip6[0]);
    CTX_LOAD(r1, remote_ip6[1]);
    CTX_LOAD(r2, remote_ip6[2]);
    CTX_LOAD(r3, remote_ip6[3]);
    if (ctx->family == AF_INET) {
        v4_mapped(&t->local, l4);
        v4_mapped(&t->remote, r4);
    } else {
        __u32 *l = (__u32 *)t->local.a, *r = (__u32 *)t->remote.a;
        l[0] = l0;
        l[1] = l1;
        l[2] = l2;
        l[3] = l3;
        r[0] = r0;
        r[1] = r1;
        r[2] = r2;
        r[3] = r3;
    }
    t->local_port = (__u16)ctx->local_port;
    /* The context loads the network-order port into the upper half of the word. */
    t->remote_port = (__u16)bpf_ntohl(ctx->remote_port);
}

static __always_inline int is_tcp_ip(struct bpf_sock_ops *ctx)
{
    return ctx->family == AF_INET || ctx->family == AF_INET6;
}

static __always_inline void flow_key_of(struct tuple *t, __u8 direction, struct flow_key *key)
{
    if (direction == DIR_OUTBOUND) {
        __builtin_memcpy(key->client, t->local.a, 16);
        __builtin_memcpy(key->server, t->remote.a, 16);
        key->server_port = t->remote_port;
    } else {
        __builtin_memcpy(key->client, t->remote.a, 16);
        __builtin_memcpy(key->server, t->local.a, 16);
        key->server_port = t->local_port;
    }
    key->direction = direction;
}

static __always_inline int is_known(struct tuple *t)
{
    return known_addrs.lookup(&t->local) || known_addrs.lookup(&t->remote);
}

/* The counters of the flow `socket_key` names, in the current generation (see struct
 * flow_key), created zeroed on first use. */
static __always_inline struct flow_counters *flow_of(const struct flow_key *socket_key)
{
    struct flow_key key = *socket_key;
    key.generation = (__u8)setting(SETTING_GENERATION);
    struct flow_counters *c = flows.lookup(&key);
    if (c)
        return c;
    int zero = 0;
    struct flow_counters *blank = zero_flow.lookup(&zero);
    if (!blank)
        return NULL;
    flows.insert(&key, blank); /* fails harmlessly when another CPU created it first */
    c = flows.lookup(&key);
    if (!c)
        count(STAT_FLOWS_FULL);
    return c;
}

/* ---- Histograms ---------------------------------------------------------------------- */

/* Bucket index: the first bound the value does not exceed, or BUCKETS - 1. The bounds are
 * constants, so this compiles to a chain of compares. */
#define BUCKET_STEP(bound) \
    if (v <= (bound)) \
        return i; \
    i++;

static __always_inline int latency_bucket(__u64 v)
{
    int i = 0;
    LATENCY_BOUNDS_US(BUCKET_STEP)
    return i;
}

static __always_inline int duration_bucket(__u64 v)
{
    int i = 0;
    DURATION_BOUNDS_US(BUCKET_STEP)
    return i;
}

static __always_inline void observe(struct histogram *h, int bucket, __u64 value_us)
{
    if (bucket < 0 || bucket >= BUCKETS)
        return;
    __sync_fetch_and_add(&h->buckets[bucket], 1);
    __sync_fetch_and_add(&h->sum_us, value_us);
}

/* ---- A connection starts ------------------------------------------------------------- */

static __always_inline struct sock_state *state_of(struct bpf_sock_ops *ctx)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    return socks.lookup(&cookie);
}

static __always_inline void enable_callbacks(struct bpf_sock_ops *ctx, __u32 flags)
{
    bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | flags);
}

/* A new connection: OUTBOUND at connect(), INBOUND once accepted. Only one with a known
 * end gets state and callbacks: the rest are counted once here and cost nothing more. */
static __always_inline void on_start(struct bpf_sock_ops *ctx, __u8 direction)
{
    struct tuple t = {};
    read_tuple(ctx, &t);
    if (!is_known(&t)) {
        count(STAT_UNATTRIBUTED);
        return;
    }
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct sock_state st = {.start_ns = bpf_ktime_get_ns()};
    flow_key_of(&t, direction, &st.key);
    st.client_port = direction == DIR_OUTBOUND ? t.local_port : t.remote_port;
    if (direction == DIR_INBOUND) {
        st.established_ns = st.last_record_ns = st.start_ns;
        st.flags = SF_ESTABLISHED;
    }
    if (socks.update(&cookie, &st)) {
        count(STAT_SOCKS_FULL);
        return;
    }
    if (direction == DIR_OUTBOUND) {
        enable_callbacks(ctx, BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG);
        return;
    }
    count(STAT_OPENED);
    enable_callbacks(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
    struct flow_counters *c = flow_of(&st.key);
    if (c)
        __sync_fetch_and_add(&c->opened, 1);
}

static __always_inline void on_active_established(struct bpf_sock_ops *ctx)
{
    struct sock_state *st = state_of(ctx);
    if (!st)
        return;
    __u64 now = bpf_ktime_get_ns();
    st->established_ns = st->last_record_ns = now;
    st->flags |= SF_ESTABLISHED;
    count(STAT_OPENED);
    struct flow_counters *c = flow_of(&st->key);
    if (!c)
        return;
    __sync_fetch_and_add(&c->opened, 1);
    __u64 handshake_us = (now - st->start_ns) / 1000;
    observe(&c->connect, latency_bucket(handshake_us), handshake_us);
}

/* ---- Bytes and losses ---------------------------------------------------------------- */

/* A socket's totals so far: application bytes, and segments retransmitted and lost. */
struct progress {
    __u64 sent;
    __u64 received;
    __u32 retrans;
    __u32 lost;
};

static __always_inline __u64 minus(__u64 v, __u64 d)
{
    return v > d ? v - d : 0;
}

/* Application bytes: bytes_acked and bytes_received count sequence numbers, so the
 * client's SYN and each FIN that was really acknowledged or taken are removed. `our_fin`:
 * our FIN was acknowledged, so bytes_acked counts it; `peer_fin`: the peer's FIN was
 * taken, so bytes_received counts it. */
static __always_inline void app_bytes(struct sock_state *st, __u64 acked, __u64 rcvd,
                                      int our_fin, int peer_fin, struct progress *p)
{
    if (st->key.direction == DIR_OUTBOUND)
        acked = minus(acked, 1);
    if (our_fin)
        acked = minus(acked, 1);
    if (peer_fin)
        rcvd = minus(rcvd, 1);
    p->sent = acked;
    p->received = rcvd;
}

/* The socket as the kernel's struct tcp_sock, for a field at an offset from its BTF (read
 * with a direct load, which the verifier checks against the kernel's BTF: sock_ops may not
 * call bpf_probe_read(), which older bcc versions turn bpf_probe_read_kernel() into). */
static __always_inline void *tcp_sock_of(struct bpf_sock_ops *ctx)
{
    struct bpf_sock *sk = ctx->sk;
    return sk ? bpf_skc_to_tcp_sock(sk) : NULL;
}

/* Whether the peer's FIN was taken: tcp_fin() sets SOCK_DONE in sk_flags as it takes the
 * FIN in order, which is when bytes_received counts it. A FIN that reaches only the
 * TIME_WAIT socket left behind after we closed is not counted, nor flagged. */
static __always_inline int peer_fin_taken(struct bpf_sock_ops *ctx)
{
    void *tp = tcp_sock_of(ctx);
    if (!tp)
        return 0;
    __u64 flags = *(volatile __u64 *)(tp + SOCK_FLAGS_OFF);
    return (flags >> SOCK_DONE_BIT) & 1;
}

/* At TCP_CLOSE, leaving `state`: our FIN was acknowledged if we were in FIN_WAIT2 (the
 * ACK of our FIN moved us there), or if it is all that was outstanding in CLOSING or
 * LAST_ACK. */
static __always_inline void closing_app_bytes(struct bpf_sock_ops *ctx, struct sock_state *st,
                                              __u32 state, struct progress *p)
{
    int our_fin = state == BPF_TCP_FIN_WAIT2 ||
                  ((state == BPF_TCP_CLOSING || state == BPF_TCP_LAST_ACK) &&
                   ctx->snd_una == ctx->snd_nxt);
    app_bytes(st, ctx->bytes_acked, ctx->bytes_received, our_fin, peer_fin_taken(ctx), p);
}

/* Segments retransmitted, less those the peer's D-SACKs showed to be duplicates: what was
 * really lost. (lost_out is not it: it counts segments marked lost right now, and drops
 * back as they are repaired.) */
static __always_inline __u32 lost_of(__u32 retrans, __u32 dsack_dups)
{
    return retrans > dsack_dups ? retrans - dsack_dups : 0;
}

static __always_inline __u32 lost_segments(struct bpf_sock_ops *ctx, __u32 retrans)
{
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 0;
    struct bpf_tcp_sock *tp = bpf_tcp_sock(sk);
    return tp ? lost_of(retrans, tp->dsack_dups) : 0;
}

/* Move a socket's reported total up to `now`; returns by how much, 0 when it is not
 * ahead. The sweep reads sockets without their lock (see the sweep below), so it and the
 * close may meet here: a compare-and-swap lets exactly one of them add each part, and
 * with two writers the second try always settles it. */
static __always_inline __u64 advance(__u64 *reported, __u64 now)
{
#pragma unroll
    for (int i = 0; i < 3; i++) {
        __u64 old = *(volatile __u64 *)reported;
        if (now <= old)
            return 0;
        if (__sync_val_compare_and_swap(reported, old, now) == old)
            return now - old;
    }
    return 0;
}

/* Add to the flow what this socket sent, received, retransmitted and lost since the last
 * time: counters only ever grow, and the sum over a connection's life is its exact total. */
static __always_inline void add_progress(struct sock_state *st, struct flow_counters *c,
                                         const struct progress *p)
{
    __u64 new_sent = advance(&st->reported_sent, p->sent);
    __u64 new_received = advance(&st->reported_received, p->received);
    /* Istio's terms: the destination (server) received the client's sent bytes. */
    int client = st->key.direction == DIR_OUTBOUND;
    __u64 to_server = client ? new_sent : new_received;
    __u64 to_client = client ? new_received : new_sent;
    if (to_server)
        __sync_fetch_and_add(&c->received_bytes, to_server);
    if (to_client)
        __sync_fetch_and_add(&c->sent_bytes, to_client);
    __u64 retrans = advance(&st->reported_retrans, p->retrans);
    if (retrans)
        __sync_fetch_and_add(&c->retransmits, retrans);
    __u64 lost = advance(&st->reported_lost, p->lost);
    if (lost)
        __sync_fetch_and_add(&c->lost, lost);
}

/* ---- Access-log records -------------------------------------------------------------- */

/* What a record tells of the socket's TCP state. */
struct tcp_numbers {
    __u32 srtt_us; /* in microseconds (the kernel keeps it << 3) */
    __u32 min_rtt_us;
    __u32 total_retrans;
    __u32 segs_in;
    __u32 segs_out;
};

static __always_inline void numbers_of(struct bpf_sock_ops *ctx, struct tcp_numbers *n)
{
    n->srtt_us = ctx->srtt_us >> 3;
    n->min_rtt_us = ctx->rtt_min;
    n->total_retrans = ctx->total_retrans;
    n->segs_in = ctx->segs_in;
    n->segs_out = ctx->segs_out;
}

/* `p`: this socket's application bytes; the record holds them in Istio's terms, as the
 * destination (server) saw them. Both ends' addresses and ports come from the state. */
static __always_inline void emit(struct sock_state *st, __u8 kind, __u8 reason, __u8 flags,
                                 __u64 now, const struct progress *p,
                                 const struct tcp_numbers *n)
{
    int client = st->key.direction == DIR_OUTBOUND;
    struct conn_record *r = records.ringbuf_reserve(sizeof(struct conn_record));
    if (!r) {
        count(STAT_RINGBUF_LOST);
        return;
    }
    r->time_ns = now;
    r->duration_ns = now - (kind == KIND_FAILED ? st->start_ns : st->established_ns);
    r->received_bytes = client ? p->sent : p->received;
    r->sent_bytes = client ? p->received : p->sent;
    __builtin_memcpy(r->local, client ? st->key.client : st->key.server, 16);
    __builtin_memcpy(r->remote, client ? st->key.server : st->key.client, 16);
    r->local_port = client ? st->client_port : st->key.server_port;
    r->remote_port = client ? st->key.server_port : st->client_port;
    r->kind = kind;
    r->direction = st->key.direction;
    r->reason = reason;
    r->flags = flags;
    r->srtt_us = n->srtt_us;
    r->min_rtt_us = n->min_rtt_us;
    r->total_retrans = n->total_retrans;
    r->segs_in = n->segs_in;
    r->segs_out = n->segs_out;
    r->_pad = 0;
    /* No wakeup: user space drains the ring on its own tick, so a close never pays for
     * waking a reader, and records are handled in batches. */
    records.ringbuf_submit(r, BPF_RB_NO_WAKEUP);
}

/* ---- A connection ends --------------------------------------------------------------- */

static __always_inline __u8 failure_reason(struct sock_state *st, int reset)
{
    if (st->flags & SF_RTO_EXPIRED)
        return REASON_TIMEOUT;
    if (reset)
        return REASON_REFUSED;
    return REASON_OTHER;
}

static __always_inline void close_established(struct bpf_sock_ops *ctx, struct sock_state *st,
                                              __u32 old_state, __u64 now, __u8 flags)
{
    struct progress p = {.retrans = ctx->total_retrans, .lost = st->reported_lost};
    closing_app_bytes(ctx, st, old_state, &p);
    if (p.retrans > st->reported_retrans)
        p.lost = lost_segments(ctx, p.retrans);
    count(STAT_CLOSED);
    struct flow_counters *c = flow_of(&st->key);
    if (c) {
        add_progress(st, c, &p);
        __sync_fetch_and_add(&c->closed, 1);
        if (flags & RECORD_RESET)
            __sync_fetch_and_add(&c->reset, 1);
        __u64 lived_us = (now - st->established_ns) / 1000;
        observe(&c->duration, duration_bucket(lived_us), lived_us);
        __u64 srtt_us = ctx->srtt_us >> 3, min_rtt_us = ctx->rtt_min;
        if (srtt_us) /* zero: no RTT sample was ever taken */
            observe(&c->srtt, latency_bucket(srtt_us), srtt_us);
        if (min_rtt_us && min_rtt_us != ~0U)
            observe(&c->min_rtt, latency_bucket(min_rtt_us), min_rtt_us);
    }
    if (setting(SETTING_RECORDS)) {
        struct tcp_numbers n;
        numbers_of(ctx, &n);
        emit(st, KIND_CLOSED, REASON_NONE, flags, now, &p, &n);
    }
}

static __always_inline void close_failed(struct bpf_sock_ops *ctx, struct sock_state *st,
                                         __u64 now, __u8 flags)
{
    __u8 reason = failure_reason(st, flags & RECORD_RESET);
    count(STAT_FAILED);
    struct flow_counters *c = flow_of(&st->key);
    if (c) {
        __sync_fetch_and_add(&c->failed, 1);
        if (reason == REASON_REFUSED)
            __sync_fetch_and_add(&c->refused, 1);
        else if (reason == REASON_TIMEOUT)
            __sync_fetch_and_add(&c->timeout, 1);
    }
    if (setting(SETTING_RECORDS)) {
        struct progress p = {};
        struct tcp_numbers n;
        numbers_of(ctx, &n);
        emit(st, KIND_FAILED, reason, flags, now, &p, &n);
    }
}

static __always_inline void on_close(struct bpf_sock_ops *ctx, struct sock_state *st,
                                     __u32 old_state, __u64 cookie)
{
    __u64 now = bpf_ktime_get_ns();
    __u8 flags = (st->flags & SF_RESET) ? RECORD_RESET : 0;
    if (st->flags & SF_ESTABLISHED)
        close_established(ctx, st, old_state, now, flags);
    else if (st->key.direction == DIR_OUTBOUND)
        close_failed(ctx, st, now, flags);
    socks.delete(&cookie);
}

/* Whether a RST closes the socket now: tcp_reset() sets sk_err to ECONNREFUSED (in
 * SYN_SENT), EPIPE (in CLOSE_WAIT) or ECONNRESET, then closes it; every other close leaves
 * none of those in sk_err as it happens (an application's reset sets ECONNRESET only after
 * the close). sock_ops has no callback that says why a socket closed, and this needs no
 * tracepoint: no program of kmeshd's outlives a clean stop. The exception: an ICMP port
 * unreachable answering a SYN also sets ECONNREFUSED, and counts as refused too. */
static __always_inline int closed_by_reset(struct bpf_sock_ops *ctx)
{
    void *tp = tcp_sock_of(ctx);
    if (!tp)
        return 0;
    int err = *(volatile int *)(tp + SOCK_ERR_OFF);
    return err == ECONNRESET || err == ECONNREFUSED || err == EPIPE;
}

static __always_inline void on_state(struct bpf_sock_ops *ctx)
{
    /* Only the close changes anything here: return before the socket's state is looked up. */
    if (ctx->args[1] != BPF_TCP_CLOSE)
        return;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct sock_state *st = socks.lookup(&cookie);
    if (!st)
        return;
    if (closed_by_reset(ctx))
        st->flags |= SF_RESET;
    on_close(ctx, st, ctx->args[0], cookie);
}

/* ---- The programs -------------------------------------------------------------------- */

int kmeshd_sockops(struct bpf_sock_ops *ctx)
{
    if (!is_tcp_ip(ctx))
        return 1;
    switch (ctx->op) {
    case BPF_SOCK_OPS_TCP_CONNECT_CB:
        on_start(ctx, DIR_OUTBOUND);
        break;
    case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
        on_active_established(ctx);
        break;
    case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
        on_start(ctx, DIR_INBOUND);
        break;
    case BPF_SOCK_OPS_STATE_CB:
        on_state(ctx);
        break;
    case BPF_SOCK_OPS_RTO_CB:
        if (ctx->args[2]) {
            struct sock_state *st = state_of(ctx);
            if (st)
                st->flags |= SF_RTO_EXPIRED;
        }
        break;
    }
    return 1;
}

#ifdef TCP_BYTES_ACKED_OFF
/* ---- The socket sweep (bpf.live_updates) --------------------------------------------- */

/* Before each publish, user space runs this iterator once (kmeshd/kernel/probe.py): every
 * tracked connection that is open adds what it moved since the last time to its flow, as
 * its close would. So open connections show their bytes at each publish, however long
 * they last and however quiet they have gone, at no cost per packet.
 *
 * It walks every open file of every process (bpf_iter__task_file), which reaches each
 * socket whatever its network namespace, without entering any: the daemon needs no
 * CAP_SYS_ADMIN for it (a TCP iterator sees only the namespace it is started in). Sockets
 * no process holds a file of (waiting in an accept queue, or held by io_uring or the
 * kernel) are not reached: their bytes come at the next sweep that does, or at the close,
 * and user space counts them (kmeshd_sweep_sockets_unreached).
 *
 * The iterator does not hold the socket's lock, so it reads the socket the way a seqlock
 * reader would: the kernel counts each segment in segs_in (under the socket's lock) before
 * it processes it, and only segments move bytes_acked, bytes_received and the peer's FIN;
 * a reading taken while the lock was free and segs_in stood still is one the kernel could
 * have given under the lock. A socket busy all three tries is left to the next sweep and
 * counted (STAT_SWEEP_BUSY). Loads are ordered on x86; reads go through
 * bpf_probe_read_kernel, so a socket that goes away meanwhile reads as zeros, never a
 * fault. Field offsets come from the running kernel's BTF.
 *
 * The iterator's context: the kernel defines struct bpf_iter__task_file in task_iter.c,
 * not in a header, so it is declared here (the verifier checks each access against the
 * kernel's own type). */
struct bpf_iter__task_file {
    struct bpf_iter_meta *meta;
    struct task_struct *task;
    __u32 fd;
    struct file *file;
};

static __always_inline __u64 tcp_u64(void *tp, int offset)
{
    __u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), tp + offset);
    return v;
}

static __always_inline __u32 tcp_u32(void *tp, int offset)
{
    __u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), tp + offset);
    return v;
}

static __always_inline void sweep_numbers(void *tp, struct tcp_numbers *n)
{
    n->srtt_us = tcp_u32(tp, TCP_SRTT_US_OFF) >> 3;
    n->min_rtt_us = tcp_u32(tp, TCP_MIN_RTT_OFF);
    n->total_retrans = tcp_u32(tp, TCP_TOTAL_RETRANS_OFF);
    n->segs_in = tcp_u32(tp, TCP_SEGS_IN_OFF);
    n->segs_out = tcp_u32(tp, TCP_SEGS_OUT_OFF);
}

/* What the sweep reads of a socket, taken together (see above). */
struct reading {
    __u64 acked;
    __u64 received;
    __u32 retrans;
    __u32 dsack_dups;
    __u32 segs_in;
    __u8 state;
};

static __always_inline int socket_in_use(void *tp)
{
    return tcp_u32(tp, TCP_SLOCK_OFF) || tcp_u32(tp, TCP_OWNED_OFF);
}

static __always_inline int read_quiet(void *tp, struct reading *r)
{
#pragma unroll
    for (int i = 0; i < 3; i++) {
        __u32 segs = tcp_u32(tp, TCP_SEGS_IN_OFF);
        r->segs_in = segs;
        if (socket_in_use(tp))
            continue;
        bpf_probe_read_kernel(&r->state, sizeof(r->state), tp + TCP_STATE_OFF);
        r->acked = tcp_u64(tp, TCP_BYTES_ACKED_OFF);
        r->received = tcp_u64(tp, TCP_BYTES_RECEIVED_OFF);
        r->retrans = tcp_u32(tp, TCP_TOTAL_RETRANS_OFF);
        r->dsack_dups = tcp_u32(tp, TCP_DSACK_DUPS_OFF);
        if (tcp_u32(tp, TCP_SEGS_IN_OFF) == segs)
            return 1;
    }
    return 0;
}

/* accesslog.periodic: a record of an open connection's totals, at most once a period. */
static __always_inline void maybe_record_progress(void *tp, struct sock_state *st,
                                                  const struct progress *p)
{
    __u64 period = setting(SETTING_PERIODIC);
    if (!period || !setting(SETTING_RECORDS))
        return;
    __u64 now = bpf_ktime_get_ns();
    if (now - st->last_record_ns < period)
        return;
    st->last_record_ns = now;
    struct tcp_numbers n;
    sweep_numbers(tp, &n);
    emit(st, KIND_PROGRESS, REASON_NONE, 0, now, p, &n);
}

/* The tracked socket behind an open file, or NULL. */
static __always_inline void *tracked_socket(struct file *file, struct sock_state **st)
{
    struct socket *sock = bpf_sock_from_file(file);
    if (!sock)
        return NULL;
    void *tp = NULL;
    bpf_probe_read_kernel(&tp, sizeof(tp), (void *)sock + SOCKET_SK_OFF);
    if (!tp)
        return NULL;
    /* Set by the sock_ops program's first bpf_get_socket_cookie(): a tracked socket has
     * one, and cookies are never reused. */
    __u64 cookie = tcp_u64(tp, TCP_COOKIE_OFF);
    if (!cookie)
        return NULL;
    *st = socks.lookup(&cookie);
    return *st ? tp : NULL;
}

int bpf_iter__task_file(struct bpf_iter__task_file *ctx)
{
    struct file *file = ctx->file;
    if (!file)
        return 0;
    struct sock_state *st = NULL;
    void *tp = tracked_socket(file, &st);
    if (!tp || !st || !(st->flags & SF_ESTABLISHED))
        return 0;
    __u32 pass = (__u32)setting(SETTING_SWEEP_PASS);
    if (st->swept == pass) /* one more file of a socket read this pass already */
        return 0;
    /* Idle since it was last read: every change the sweep reads comes with a segment in
     * (bytes, the peer's FIN) or out (retransmits, our FIN), so nothing moved. The common
     * case of a long-lived connection, at two reads. */
    __u32 segs_out = tcp_u32(tp, TCP_SEGS_OUT_OFF);
    if (tcp_u32(tp, TCP_SEGS_IN_OFF) + segs_out == st->swept_segs) {
        st->swept = pass;
        return 0;
    }
    struct reading r = {};
    if (!read_quiet(tp, &r)) {
        count(STAT_SWEEP_BUSY);
        return 0;
    }
    st->swept = pass;
    /* What the reading saw, or less: a segment after it makes the next sweep read again. */
    st->swept_segs = r.segs_in + segs_out;
    /* Only ESTABLISHED and CLOSE_WAIT: there the FINs counted in bytes_acked and
     * bytes_received are known for certain (none, or the peer's); the rest of a closing
     * connection's bytes come with its close. */
    if (r.state != BPF_TCP_ESTABLISHED && r.state != BPF_TCP_CLOSE_WAIT)
        return 0;
    struct progress p = {.retrans = r.retrans, .lost = st->reported_lost};
    /* In CLOSE_WAIT the peer's FIN was taken; we have sent none. */
    app_bytes(st, r.acked, r.received, 0, r.state == BPF_TCP_CLOSE_WAIT, &p);
    if (p.sent <= st->reported_sent && p.received <= st->reported_received &&
        p.retrans <= st->reported_retrans)
        return 0;
    if (p.retrans > st->reported_retrans)
        p.lost = lost_of(p.retrans, r.dsack_dups);
    struct flow_counters *c = flow_of(&st->key);
    if (c)
        add_progress(st, c, &p);
    maybe_record_progress(tp, st, &p);
    return 0;
}
#endif
