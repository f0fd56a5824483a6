/* cfwd: a C recvmmsg/sendmmsg forwarder with edge-relay's addressing and no
 * authentication. A measuring instrument for bench/run.py, never shipped.
 *
 * Usage: cfwd PUBLIC_FD INTERNAL_FD TX_IPV4 TX_PORT
 *   PUBLIC_FD    bound UDP socket clients send to (inherited)
 *   INTERNAL_FD  bound UDP socket the transceiver sends to (inherited)
 * Client -> transceiver: prepend a 48-octet header in the layout of
 * docs/PROTOCOL.md section 4 (magic, version 1, type 1, family 4, client port
 * and address; timestamp and tag left zero) as a second iovec, send to TX.
 * Transceiver -> client: check length and magic, read family/port/address
 * from the header, send the payload after octet 48 to that IPv4 client.
 * Exits on SIGTERM. Built with gcc -O2 at bench time.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 32
#define BUFSIZE 2048
#define HDR 48

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static unsigned char rbuf[BATCH][BUFSIZE];
static struct sockaddr_in rname[BATCH];
static struct iovec riov[BATCH];
static struct mmsghdr rmsg[BATCH];
static unsigned char shead[BATCH][HDR];
static struct sockaddr_in sname[BATCH];
static struct iovec siov[BATCH][2];
static struct mmsghdr smsg[BATCH];

static int recv_batch(int fd)
{
    for (int i = 0; i < BATCH; i++) {
        riov[i].iov_base = rbuf[i];
        riov[i].iov_len = BUFSIZE;
        rmsg[i].msg_hdr.msg_name = &rname[i];
        rmsg[i].msg_hdr.msg_namelen = sizeof rname[i];
        rmsg[i].msg_hdr.msg_iov = &riov[i];
        rmsg[i].msg_hdr.msg_iovlen = 1;
        rmsg[i].msg_hdr.msg_control = NULL;
        rmsg[i].msg_hdr.msg_controllen = 0;
        rmsg[i].msg_hdr.msg_flags = 0;
    }
    int n = recvmmsg(fd, rmsg, BATCH, MSG_DONTWAIT, NULL);
    return n < 0 ? 0 : n;
}

static void send_batch(int fd, int count)
{
    int pos = 0, tries = 0;
    while (pos < count && tries < 8) {
        int n = sendmmsg(fd, smsg + pos, count - pos, MSG_DONTWAIT);
        if (n > 0) { pos += n; continue; }
        if (n < 0 && errno != EAGAIN && errno != ENOBUFS && errno != EINTR) pos++;  /* skip it */
        tries++;
    }
}

/* Client -> transceiver. */
static int from_clients(int pub, int internal, const struct sockaddr_in *tx)
{
    int n = recv_batch(pub), out = 0;
    for (int i = 0; i < n; i++) {
        if (rmsg[i].msg_hdr.msg_flags & MSG_TRUNC) continue;
        unsigned char *h = shead[out];
        memset(h, 0, HDR);
        h[0] = 0xEE; h[1] = 0x52; h[2] = 1; h[3] = 1; h[7] = 4;
        memcpy(h + 8, &rname[i].sin_port, 2);
        memcpy(h + 10, &rname[i].sin_addr, 4);
        sname[out] = *tx;
        siov[out][0].iov_base = h;
        siov[out][0].iov_len = HDR;
        siov[out][1].iov_base = rbuf[i];
        siov[out][1].iov_len = rmsg[i].msg_len;
        smsg[out].msg_hdr.msg_name = &sname[out];
        smsg[out].msg_hdr.msg_namelen = sizeof sname[out];
        smsg[out].msg_hdr.msg_iov = siov[out];
        smsg[out].msg_hdr.msg_iovlen = 2;
        out++;
    }
    if (out) send_batch(internal, out);
    return n;
}

/* Transceiver -> client. */
static int from_transceiver(int internal, int pub)
{
    int n = recv_batch(internal), out = 0;
    for (int i = 0; i < n; i++) {
        unsigned char *d = rbuf[i];
        unsigned len = rmsg[i].msg_len;
        if ((rmsg[i].msg_hdr.msg_flags & MSG_TRUNC) || len < HDR || d[0] != 0xEE || d[1] != 0x52 || d[7] != 4)
            continue;
        memset(&sname[out], 0, sizeof sname[out]);
        sname[out].sin_family = AF_INET;
        memcpy(&sname[out].sin_port, d + 8, 2);
        memcpy(&sname[out].sin_addr, d + 10, 4);
        siov[out][0].iov_base = d + HDR;
        siov[out][0].iov_len = len - HDR;
        smsg[out].msg_hdr.msg_name = &sname[out];
        smsg[out].msg_hdr.msg_namelen = sizeof sname[out];
        smsg[out].msg_hdr.msg_iov = siov[out];
        smsg[out].msg_hdr.msg_iovlen = 1;
        out++;
    }
    if (out) send_batch(pub, out);
    return n;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: cfwd PUBLIC_FD INTERNAL_FD TX_IPV4 TX_PORT\n");
        return 2;
    }
    int pub = atoi(argv[1]), internal = atoi(argv[2]);
    struct sockaddr_in tx = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[4]))};
    if (inet_pton(AF_INET, argv[3], &tx.sin_addr) != 1) {
        fprintf(stderr, "cfwd: bad IPv4 address %s\n", argv[3]);
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.fd = pub;
    epoll_ctl(ep, EPOLL_CTL_ADD, pub, &ev);
    ev.data.fd = internal;
    epoll_ctl(ep, EPOLL_CTL_ADD, internal, &ev);
    while (!stop) {
        struct epoll_event ready[2];
        int k = epoll_wait(ep, ready, 2, 200);
        for (int j = 0; j < k; j++) {
            /* Bounded work per wake-up, as the Python worker does (8 batches). */
            for (int b = 0; b < 8; b++) {
                int n = ready[j].data.fd == pub ? from_clients(pub, internal, &tx)
                                                : from_transceiver(internal, pub);
                if (n < BATCH) break;
            }
        }
    }
    return 0;
}
