/* cgen: a C load generator and receiver in one process, for the edge-relay vs
 * coturn comparison in bench/run.py. A measuring instrument, never shipped.
 *
 * Usage: cgen SPEC_FILE
 * The spec (written by bench/run.py, little-endian, see SPEC below) holds the
 * phase's timing, the inherited fds to send from and to receive on, and
 * every datagram pre-built with its sender fd and IPv4 destination: this
 * program never builds, seals or parses a datagram, so the same generator
 * drives both relays. Datagram i carries its index i at `id_offset` as
 * received (a big-endian u32 the sender put in the payload), which is how a
 * received datagram is matched with its send time for latency.
 *
 * Modes:
 *   closed  keep at most `window` datagrams in flight (sent - received),
 *           sending runs of consecutive datagrams with the same sender fd
 *           through sendmmsg (up to 32); a stall of 20 ms without progress
 *           writes the in-flight datagrams off as lost.
 *   paced   `rate` datagrams per second, each send stamped (CLOCK_MONOTONIC)
 *           in a table by index; a receive looks its index up: one-way
 *           latency = receive time - send time.
 * Counts (and latency samples) are taken between t0 + warm and end only.
 * Receiving: every recv fd in one epoll set, recvmmsg in batches of 32.
 * Waiting: ppoll on the epoll fd with a nanosecond timeout (1 us timer slack).
 * Output: one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
#define BUFSIZE 2048
#define STALL_NS 20000000LL

/* SPEC: "CGEN" u32 mode(0 closed, 1 paced) u32 rate u32 window u32 id_offset
 *       u64 t0_ns u64 warm_ns(absolute) u64 end_ns(absolute)
 *       u32 n_send_fds u32 n_recv_fds u32 n_msgs
 *       i32 send_fds[n_send_fds] i32 recv_fds[n_recv_fds]
 *       n_msgs x { u32 fd_index, u8 sockaddr_in[16], u32 len, u8 data[len] } */
struct msg { int fd; struct sockaddr_in to; uint32_t len; unsigned char *data; };

static struct msg *msgs;
static uint32_t n_msgs;
static int64_t *sent_at;
static int64_t *lat;
static size_t n_lat, cap_lat;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static unsigned char *spec;
static size_t spec_len, spec_pos;

static void need(size_t n)
{
    if (spec_pos + n > spec_len) { fprintf(stderr, "cgen: spec truncated\n"); exit(2); }
}
static uint32_t u32(void) { uint32_t v; need(4); memcpy(&v, spec + spec_pos, 4); spec_pos += 4; return v; }
static uint64_t u64(void) { uint64_t v; need(8); memcpy(&v, spec + spec_pos, 8); spec_pos += 8; return v; }

static unsigned char rbuf[BATCH][BUFSIZE];
static struct iovec riov[BATCH];
static struct mmsghdr rmsg[BATCH];
static struct iovec siov[BATCH];
static struct mmsghdr smsg[BATCH];

static uint64_t received, counted, sent, written_off, stalls, send_errors;

/* Drain fd: count, and when `paced`, sample latency of datagrams in the window. */
static void drain(int fd, int paced, uint32_t id_offset, int64_t w0, int64_t end)
{
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            riov[i].iov_base = rbuf[i];
            riov[i].iov_len = BUFSIZE;
            memset(&rmsg[i].msg_hdr, 0, sizeof rmsg[i].msg_hdr);
            rmsg[i].msg_hdr.msg_iov = &riov[i];
            rmsg[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(fd, rmsg, BATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        int64_t t = now_ns();
        received += n;
        if (t >= w0 && t < end) {
            counted += n;
            if (paced) {
                for (int i = 0; i < n; i++) {
                    if (rmsg[i].msg_len < id_offset + 4) continue;
                    const unsigned char *p = rbuf[i] + id_offset;
                    uint32_t id = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
                    if (id >= n_msgs || !sent_at[id]) continue;
                    if (n_lat == cap_lat) {
                        cap_lat = cap_lat ? 2 * cap_lat : 65536;
                        lat = realloc(lat, cap_lat * sizeof *lat);
                        if (!lat) exit(3);
                    }
                    lat[n_lat++] = t - sent_at[id];
                }
            }
        }
        if (n < BATCH) return;
    }
}

/* Send msgs[k..k+count-1] (same fd); returns how many the kernel took. */
static int send_run(uint32_t k, int count, int64_t stamp)
{
    for (int i = 0; i < count; i++) {
        struct msg *m = &msgs[k + i];
        siov[i].iov_base = m->data;
        siov[i].iov_len = m->len;
        memset(&smsg[i].msg_hdr, 0, sizeof smsg[i].msg_hdr);
        smsg[i].msg_hdr.msg_name = &m->to;
        smsg[i].msg_hdr.msg_namelen = sizeof m->to;
        smsg[i].msg_hdr.msg_iov = &siov[i];
        smsg[i].msg_hdr.msg_iovlen = 1;
        if (stamp) sent_at[k + i] = stamp;
    }
    int pos = 0, tries = 0;
    while (pos < count && tries < 4) {
        int n = sendmmsg(msgs[k].fd, smsg + pos, count - pos, MSG_DONTWAIT);
        if (n > 0) { pos += n; continue; }
        if (n < 0 && errno != EAGAIN && errno != ENOBUFS && errno != EINTR) { send_errors++; pos++; }
        tries++;
    }
    return pos;
}

static int run_len(uint32_t k, int limit)
{
    int c = 1;
    while (c < limit && k + c < n_msgs && msgs[k + c].fd == msgs[k].fd) c++;
    return c;
}

static int cmp64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static double q(double x) { return n_lat ? lat[(size_t)(x * n_lat) < n_lat ? (size_t)(x * n_lat) : n_lat - 1] / 1000.0 : 0; }

int main(int argc, char **argv)
{
    if (argc != 2) { fprintf(stderr, "usage: cgen SPEC_FILE\n"); return 2; }
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror("cgen: spec"); return 2; }
    fseek(f, 0, SEEK_END);
    spec_len = (size_t)ftell(f);
    rewind(f);
    spec = malloc(spec_len);
    if (!spec || fread(spec, 1, spec_len, f) != spec_len) { fprintf(stderr, "cgen: read spec\n"); return 2; }
    fclose(f);
    need(4);
    if (memcmp(spec, "CGEN", 4)) { fprintf(stderr, "cgen: not a spec\n"); return 2; }
    spec_pos = 4;
    uint32_t mode = u32(), rate = u32(), window = u32(), id_offset = u32();
    int64_t t0 = (int64_t)u64(), w0 = (int64_t)u64(), end = (int64_t)u64();
    uint32_t n_send = u32(), n_recv = u32();
    n_msgs = u32();
    int *send_fds = calloc(n_send + 1, sizeof *send_fds), *recv_fds = calloc(n_recv + 1, sizeof *recv_fds);
    for (uint32_t i = 0; i < n_send; i++) send_fds[i] = (int)u32();
    for (uint32_t i = 0; i < n_recv; i++) recv_fds[i] = (int)u32();
    msgs = calloc(n_msgs + 1, sizeof *msgs);
    sent_at = calloc(n_msgs + 1, sizeof *sent_at);
    for (uint32_t i = 0; i < n_msgs; i++) {
        uint32_t fi = u32();
        if (fi >= n_send) { fprintf(stderr, "cgen: bad fd index\n"); return 2; }
        msgs[i].fd = send_fds[fi];
        need(16);
        memcpy(&msgs[i].to, spec + spec_pos, 16);
        spec_pos += 16;
        msgs[i].len = u32();
        need(msgs[i].len);
        msgs[i].data = spec + spec_pos;
        spec_pos += msgs[i].len;
    }
    if (!n_msgs) { fprintf(stderr, "cgen: no datagrams\n"); return 2; }
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);

    int ep = epoll_create1(0);
    for (uint32_t i = 0; i < n_recv; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = recv_fds[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, recv_fds[i], &ev);
    }
    struct epoll_event ready[64];
    struct pollfd pfd = {.fd = ep, .events = POLLIN};

    int64_t t = now_ns();
    if (t0 > t) {
        struct timespec ts = {.tv_sec = (t0 - t) / 1000000000LL, .tv_nsec = (t0 - t) % 1000000000LL};
        nanosleep(&ts, NULL);
    }
    uint32_t k = 0;
    uint64_t last_rx = 0;
    int64_t last_change = now_ns();
    const int paced = mode == 1;
    for (;;) {
        t = now_ns();
        if (t >= end + 100000000LL) break;
        long long wait_ns = 0;
        if (t < end) {
            if (paced) {
                long long due = (long long)((double)(t - t0) * rate / 1e9) + 1 - (long long)sent;
                if (due > 0) {
                    int c = run_len(k, due < BATCH ? (int)due : BATCH);
                    sent += send_run(k, c, t);
                    k = (k + c) % n_msgs;
                    wait_ns = 0;
                } else {
                    wait_ns = (long long)(1e9 / rate) / 2;
                    if (wait_ns > 200000) wait_ns = 200000;
                }
            } else {
                uint64_t inflight = sent - written_off - received;
                if (inflight + BATCH <= window) {
                    int c = run_len(k, BATCH);
                    sent += send_run(k, c, 0);
                    k = (k + c) % n_msgs;
                } else {
                    if (received != last_rx) { last_rx = received; last_change = t; }
                    else if (t - last_change > STALL_NS) {
                        written_off = sent - received;
                        stalls++;
                        last_change = t;
                    }
                    wait_ns = 50000;
                }
            }
        } else {
            wait_ns = 1000000;
        }
        if (wait_ns) {
            struct timespec ts = {.tv_sec = 0, .tv_nsec = wait_ns};
            ppoll(&pfd, 1, &ts, NULL);
        }
        int nr = epoll_wait(ep, ready, 64, 0);
        for (int j = 0; j < nr; j++) drain(ready[j].data.fd, paced, id_offset, w0, end);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    qsort(lat, n_lat, sizeof *lat, cmp64);
    printf("{\"sent\": %llu, \"received\": %llu, \"counted\": %llu, \"written_off\": %llu, \"stalls\": %llu,"
           " \"send_errors\": %llu, \"cpu_s\": %.6f, \"latency_n\": %zu, \"p50\": %.3f, \"p99\": %.3f,"
           " \"p999\": %.3f, \"max\": %.3f}\n",
           (unsigned long long)sent, (unsigned long long)received, (unsigned long long)counted,
           (unsigned long long)written_off, (unsigned long long)stalls, (unsigned long long)send_errors,
           ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6,
           n_lat, q(0.50), q(0.99), q(0.999), n_lat ? lat[n_lat - 1] / 1000.0 : 0.0);
    return 0;
}
