/* Connection-churn load generator for `make bench`.
 *
 *   loadgen serve ADDR PORT THREADS REPLY
 *       accept forever on SO_REUSEPORT listeners; read the request, write REPLY bytes, close
 *       (the server closes first, so TIME_WAIT stays on the server side)
 *   loadgen connect ADDR PORT THREADS SECONDS REQUEST REPLY
 *       each thread: connect, send REQUEST bytes, read REPLY bytes and EOF, close; repeat.
 *       Prints "<connections> <request bytes> <reply bytes> <errors>" for the whole run.
 *   loadgen once ADDR PORT REQUEST REPLY
 *       one connection as above; prints the CLOCK_MONOTONIC time of its close(), in seconds
 *       (the clock Python's time.monotonic() reads), or exits 1 if the exchange failed.
 *   loadgen sink ADDR PORT
 *       accept connections one after the other; read each to EOF, then close it
 *   loadgen bulk ADDR PORT SECONDS
 *       one connection: write as fast as it goes for SECONDS, shut down the sending side
 *       and wait for the sink's EOF, so every byte was read. Prints "<bytes> <seconds>",
 *       the time from connect to that EOF.
 *
 * `serve` binds and listens on every socket before it prints "listening", so a client
 * started after that line cannot be refused.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_storage addr;
static socklen_t addr_len;
static int port, threads, request, reply;
static double seconds;

struct result {
    uint64_t connections, sent, received, errors;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void parse_addr(const char *text)
{
    struct sockaddr_in *v4 = (struct sockaddr_in *)&addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&addr;
    memset(&addr, 0, sizeof(addr));
    if (inet_pton(AF_INET, text, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        addr_len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, text, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        addr_len = sizeof(*v6);
    } else {
        fprintf(stderr, "not an address: %s\n", text);
        exit(2);
    }
}

static int read_n(int fd, char *buf, int want)
{
    int got = 0;
    while (got < want) {
        int n = read(fd, buf, want - got > 65536 ? 65536 : want - got);
        if (n <= 0)
            return -1;
        got += n;
    }
    return got;
}

static int write_n(int fd, const char *buf, int want)
{
    int done = 0;
    while (done < want) {
        int n = write(fd, buf + done, want - done > 65536 ? 65536 : want - done);
        if (n <= 0)
            return -1;
        done += n;
    }
    return done;
}

static int listener(void)
{
    int one = 1, fd = socket(addr.ss_family, SOCK_STREAM, 0);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, (struct sockaddr *)&addr, addr_len) || listen(fd, 4096)) {
        perror("bind/listen");
        exit(1);
    }
    return fd;
}

static void *serve_thread(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char *buf = malloc(1 << 16);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0)
            continue;
        if (read_n(c, buf, request) == request)
            write_n(c, buf, reply);
        close(c);
    }
    return NULL;
}

/* One exchange on a new connection; 0 when the reply and the server's EOF both came. */
static int exchange(char *buf)
{
    int fd = socket(addr.ss_family, SOCK_STREAM, 0);
    int ok = fd >= 0 && !connect(fd, (struct sockaddr *)&addr, addr_len) &&
             write_n(fd, buf, request) == request && read_n(fd, buf, reply) == reply &&
             read(fd, buf, 1) == 0;
    if (fd >= 0)
        close(fd);
    return ok ? 0 : -1;
}

static void *connect_thread(void *arg)
{
    struct result *r = arg;
    char *buf = calloc(1, (request > reply ? request : reply) + 1);
    double end = now() + seconds;
    while (now() < end) {
        if (exchange(buf)) {
            r->errors++;
            continue;
        }
        r->connections++;
        r->sent += request;
        r->received += reply;
    }
    free(buf);
    return NULL;
}

static void *sink_thread(void *arg)
{
    int fd = (int)(intptr_t)arg;
    char *buf = malloc(1 << 17);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0)
            continue;
        while (read(c, buf, 1 << 17) > 0)
            ;
        close(c);
    }
    return NULL;
}

static int bulk(void)
{
    static char buf[1 << 17];
    uint64_t total = 0;
    double start = now(), end = start + seconds;
    int fd = socket(addr.ss_family, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, addr_len))
        return 1;
    while (now() < end) {
        if (write_n(fd, buf, sizeof(buf)) < 0)
            return 1;
        total += sizeof(buf);
    }
    shutdown(fd, SHUT_WR);
    if (read(fd, buf, 1) != 0)
        return 1;
    printf("%lu %.6f\n", total, now() - start);
    close(fd);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "sink")) {
        port = atoi(argv[3]);
        parse_addr(argv[2]);
        int fd = listener();
        printf("listening\n");
        fflush(stdout);
        sink_thread((void *)(intptr_t)fd);
        return 0;
    }
    if (argc == 5 && !strcmp(argv[1], "bulk")) {
        port = atoi(argv[3]);
        seconds = atof(argv[4]);
        parse_addr(argv[2]);
        return bulk();
    }
    if (argc >= 6 && !strcmp(argv[1], "serve")) {
        port = atoi(argv[3]);
        threads = atoi(argv[4]);
        reply = atoi(argv[5]);
        request = argc > 6 ? atoi(argv[6]) : 64;
        parse_addr(argv[2]);
        pthread_t t[64];
        int fds[64];
        for (int i = 0; i < threads && i < 64; i++)
            fds[i] = listener();
        for (int i = 0; i < threads && i < 64; i++)
            pthread_create(&t[i], NULL, serve_thread, (void *)(intptr_t)fds[i]);
        printf("listening\n");
        fflush(stdout);
        pthread_join(t[0], NULL);
        return 0;
    }
    if (argc == 8 && !strcmp(argv[1], "connect")) {
        port = atoi(argv[3]);
        threads = atoi(argv[4]);
        seconds = atof(argv[5]);
        request = atoi(argv[6]);
        reply = atoi(argv[7]);
        parse_addr(argv[2]);
        pthread_t t[64];
        struct result r[64] = {0}, total = {0};
        for (int i = 0; i < threads && i < 64; i++)
            pthread_create(&t[i], NULL, connect_thread, &r[i]);
        for (int i = 0; i < threads && i < 64; i++) {
            pthread_join(t[i], NULL);
            total.connections += r[i].connections;
            total.sent += r[i].sent;
            total.received += r[i].received;
            total.errors += r[i].errors;
        }
        printf("%lu %lu %lu %lu\n", total.connections, total.sent, total.received, total.errors);
        return 0;
    }
    if (argc == 6 && !strcmp(argv[1], "once")) {
        port = atoi(argv[3]);
        request = atoi(argv[4]);
        reply = atoi(argv[5]);
        parse_addr(argv[2]);
        char *buf = calloc(1, (request > reply ? request : reply) + 1);
        if (exchange(buf))
            return 1;
        printf("%.9f\n", now());
        return 0;
    }
    fprintf(stderr, "usage: loadgen serve ADDR PORT THREADS REPLY [REQUEST] | "
                    "loadgen connect ADDR PORT THREADS SECONDS REQUEST REPLY | "
                    "loadgen once ADDR PORT REQUEST REPLY | loadgen sink ADDR PORT | "
                    "loadgen bulk ADDR PORT SECONDS\n");
    return 2;
}
