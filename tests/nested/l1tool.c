// Helper the nested experiment (tests/nested/experiment.sh) runs inside the
// L1, where there is only busybox: a QMP client on a unix socket, a reader
// of the L2 workload header through an mmap of a PCI BAR, and a probe of a
// virtio-serial port's poll() behaviour. Built static by experiment.sh.
//
//   l1tool qmp SOCK JSON...            each command's reply on a line; exit 1 on error
//   l1tool wait-migrate SOCK SECS      polls query-migrate until completed/failed
//   l1tool wait-status SOCK STATUS SECS  polls query-status until STATUS
//   l1tool peek FILE                   the workload header at offset 0x200000
//   l1tool wait-pass FILE PASS SECS    until header pass >= PASS
//   l1tool vport DEV                   poll()/read/write behaviour of a port
//   l1tool vport-wait FD SECS          until a host client is connected to port fd FD
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int qfd = -1;
static char qbuf[1 << 16];
static size_t qlen;

static int qmp_line(char *out, size_t cap)
{
	for (;;) {
		char *nl = memchr(qbuf, '\n', qlen);
		if (nl) {
			size_t n = nl - qbuf + 1;
			size_t c = n < cap ? n : cap - 1;
			memcpy(out, qbuf, c);
			out[c] = 0;
			memmove(qbuf, qbuf + n, qlen - n);
			qlen -= n;
			return 0;
		}
		ssize_t r = read(qfd, qbuf + qlen, sizeof(qbuf) - qlen);
		if (r <= 0)
			return -1;
		qlen += r;
	}
}

// Sends one command, returns its reply (events skipped) in out.
static int qmp_cmd(const char *cmd, char *out, size_t cap)
{
	if (write(qfd, cmd, strlen(cmd)) < 0 || write(qfd, "\n", 1) < 0)
		return -1;
	for (;;) {
		if (qmp_line(out, cap))
			return -1;
		if (strstr(out, "\"return\"") || strstr(out, "\"error\""))
			return strstr(out, "\"error\"") ? 1 : 0;
	}
}

static void qmp_connect(const char *path)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	char line[4096];
	double t0 = now();

	strncpy(a.sun_path, path, sizeof(a.sun_path) - 1);
	for (;;) {
		qfd = socket(AF_UNIX, SOCK_STREAM, 0);
		if (connect(qfd, (struct sockaddr *)&a, sizeof(a)) == 0)
			break;
		close(qfd);
		if (now() - t0 > 60) {
			fprintf(stderr, "l1tool: connect %s: %s\n", path, strerror(errno));
			exit(2);
		}
		usleep(20000);
	}
	if (qmp_line(line, sizeof(line)) || qmp_cmd("{\"execute\":\"qmp_capabilities\"}", line, sizeof(line))) {
		fprintf(stderr, "l1tool: QMP handshake on %s failed\n", path);
		exit(2);
	}
}

static int wait_for(const char *cmd, const char **want, double secs)
{
	char line[8192];
	double t0 = now();

	for (;;) {
		if (qmp_cmd(cmd, line, sizeof(line)) < 0)
			return 2;
		for (const char **w = want; *w; w++)
			if (strstr(line, *w)) {
				printf("%.3f %s", now() - t0, line);
				return strstr(*w, "completed") || w == want ? 0 : 1;
			}
		if (now() - t0 > secs) {
			printf("timeout %s", line);
			return 1;
		}
		usleep(10000);
	}
}

static uint32_t *map_header(const char *file)
{
	int fd = open(file, O_RDONLY);
	if (fd < 0) {
		perror(file);
		exit(2);
	}
	void *p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0x200000);
	if (p == MAP_FAILED) {
		perror("mmap");
		exit(2);
	}
	return p;
}

static void print_header(volatile uint32_t *h)
{
	printf("magic=%08x seed=%08x pass=%u dwords=%u checksum=%08x errors=%u bad_addr=%08x bad_value=%08x heartbeat=%u\n",
	       h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8]);
}

static const char *ev(short r)
{
	static char s[64];
	snprintf(s, sizeof(s), "%s%s%s%s%s", r & POLLIN ? "IN " : "", r & POLLOUT ? "OUT " : "",
		 r & POLLHUP ? "HUP " : "", r & POLLERR ? "ERR " : "", r ? "" : "none");
	return s;
}

static void on_alarm(int sig)
{
	(void)sig;
}

// Prints what poll/read/write do on a virtio-serial port with nobody on
// the host side, waits (60 s) for a host client, says hello, prints the
// line the host answers, asks the host to disconnect and prints what the
// port does then. Closes the port once the host has gone.
static int vport(const char *dev)
{
	int fd = open(dev, O_RDWR | O_NONBLOCK);
	if (fd < 0) {
		printf("open %s: %s\n", dev, strerror(errno));
		return 1;
	}
	struct pollfd p = { .fd = fd, .events = POLLIN | POLLOUT };
	int n = poll(&p, 1, 0);
	printf("unconnected: poll(IN|OUT, 0) = %d revents=%s\n", n, ev(p.revents));
	p.events = POLLIN;
	double t0 = now();
	n = poll(&p, 1, 1000);
	printf("unconnected: poll(IN, 1000) = %d revents=%s after %.3f s\n", n, ev(p.revents), now() - t0);
	p.events = POLLOUT;
	t0 = now();
	n = poll(&p, 1, 1000);
	printf("unconnected: poll(OUT, 1000) = %d revents=%s after %.3f s\n", n, ev(p.revents), now() - t0);
	char buf[256];
	ssize_t r = read(fd, buf, sizeof(buf));
	printf("unconnected: read = %zd%s%s\n", r, r < 0 ? " " : "", r < 0 ? strerror(errno) : "");
	r = write(fd, "dropped?\n", 9);
	printf("unconnected: write(9) = %zd%s%s\n", r, r < 0 ? " " : "", r < 0 ? strerror(errno) : "");
	// The same write on a blocking descriptor, cut short by an alarm.
	struct sigaction sa = { .sa_handler = on_alarm };
	sigaction(SIGALRM, &sa, NULL);
	fcntl(fd, F_SETFL, 0);
	alarm(1);
	t0 = now();
	r = write(fd, "blocked?\n", 9);
	printf("unconnected: blocking write(9) = %zd%s%s after %.3f s\n", r, r < 0 ? " " : "",
	       r < 0 ? strerror(errno) : "", now() - t0);
	fcntl(fd, F_SETFL, O_NONBLOCK);
	printf("VPORT-WAITING\n");

	// Watch the revents change until the host connects (HUP clears).
	short last = -1;
	t0 = now();
	for (;;) {
		p.events = POLLIN | POLLOUT;
		p.revents = 0;
		poll(&p, 1, 0);
		if (p.revents != last) {
			printf("t=%.3f revents=%s\n", now() - t0, ev(p.revents));
			last = p.revents;
		}
		if (!(p.revents & POLLHUP))
			break;
		if (now() - t0 > 60) {
			printf("no host connection in 60 s\n");
			return 1;
		}
		usleep(5000);
	}
	r = write(fd, "hello from L1\n", 14);
	printf("connected: write = %zd\n", r);
	double tw = now();
	p.events = POLLIN;
	n = poll(&p, 1, 10000);
	printf("connected: poll(IN, 10000) = %d revents=%s after %.3f s\n", n, ev(p.revents), now() - tw);
	r = read(fd, buf, sizeof(buf) - 1);
	if (r > 0) {
		buf[r] = 0;
		buf[strcspn(buf, "\n")] = 0;
	}
	printf("connected: read = %zd \"%s\" (round trip %.3f s)\n", r, r > 0 ? buf : "", now() - tw);
	// The host closes its end: what do poll and read say then?
	r = write(fd, "please disconnect\n", 18);
	t0 = now();
	last = -1;
	for (;;) {
		p.events = POLLIN | POLLOUT;
		p.revents = 0;
		poll(&p, 1, 0);
		if (p.revents != last) {
			printf("after the disconnect request t=%.3f revents=%s\n", now() - t0, ev(p.revents));
			last = p.revents;
		}
		if (p.revents & POLLHUP)
			break;
		if (now() - t0 > 20) {
			printf("host did not disconnect in 20 s\n");
			break;
		}
		usleep(5000);
	}
	int zeros = 0, polls = 0;
	t0 = now();
	while (now() - t0 < 0.2) {
		p.events = POLLIN;
		if (poll(&p, 1, 1000) == 1)
			polls++;
		if (read(fd, buf, sizeof(buf)) == 0)
			zeros++;
	}
	printf("disconnected: in 0.2 s, poll(IN, 1000) returned at once %d times, read returned 0 %d times\n", polls,
	       zeros);
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 3 && !strcmp(argv[1], "qmp")) {
		char line[16384];
		int rc = 0;
		qmp_connect(argv[2]);
		for (int i = 3; i < argc; i++) {
			int e = qmp_cmd(argv[i], line, sizeof(line));
			fputs(line, stdout);
			if (e)
				rc = 1;
		}
		return rc;
	}
	if (argc == 4 && !strcmp(argv[1], "wait-migrate")) {
		const char *want[] = { "\"completed\"", "\"failed\"", "\"cancelled\"", NULL };
		qmp_connect(argv[2]);
		return wait_for("{\"execute\":\"query-migrate\"}", want, atof(argv[3]));
	}
	if (argc == 5 && !strcmp(argv[1], "wait-status")) {
		char w[128];
		snprintf(w, sizeof(w), "\"status\": \"%s\"", argv[3]);
		const char *want[] = { w, NULL };
		qmp_connect(argv[2]);
		return wait_for("{\"execute\":\"query-status\"}", want, atof(argv[4]));
	}
	if (argc == 3 && !strcmp(argv[1], "peek")) {
		print_header(map_header(argv[2]));
		return 0;
	}
	if (argc == 5 && !strcmp(argv[1], "wait-pass")) {
		volatile uint32_t *h = map_header(argv[2]);
		uint32_t want = atoi(argv[3]);
		double t0 = now();
		while (!(h[0] == 0x324c4d56 && h[2] >= want)) {
			if (now() - t0 > atof(argv[4])) {
				printf("timeout ");
				print_header(h);
				return 1;
			}
			usleep(2000);
		}
		printf("%.3f ", now() - t0);
		print_header(h);
		return 0;
	}
	if (argc == 3 && !strcmp(argv[1], "vport"))
		return vport(argv[2]);
	if (argc == 4 && !strcmp(argv[1], "vport-wait")) {
		struct pollfd p = { .fd = atoi(argv[2]), .events = POLLOUT };
		double t0 = now();
		for (;;) {
			p.revents = 0;
			poll(&p, 1, 0);
			if (p.revents & POLLNVAL)
				return 2;
			if (!(p.revents & POLLHUP))
				break;
			if (now() - t0 > atof(argv[3]))
				return 1;
			usleep(5000);
		}
		printf("%.3f\n", now() - t0);
		return 0;
	}
	fprintf(stderr, "usage: see the top of tests/nested/l1tool.c\n");
	return 2;
}
