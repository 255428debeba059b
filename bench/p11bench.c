/*
 * p11bench: a small PKCS#11 signing benchmark host.
 *
 * It dlopen()s one PKCS#11 module, initialises it with CKF_OS_LOCKING_OK, finds the
 * token by label, opens one session per thread, logs in, finds the private key by
 * CKA_LABEL, and then signs on N threads for a bounded time (and a bounded op count).
 * Every timed signature (C_SignInit + C_Sign) has its latency recorded; the result is
 * one JSON line on stdout.  Errors (any return value other than CKR_OK) are counted
 * and each distinct code is reported once on stderr.
 *
 * --sync lets several processes share one timed window: after its setup (sessions, login,
 * key, first signature) the process prints "ready" on stdout and reads one line from stdin,
 * the CLOCK_MONOTONIC time in nanoseconds at which its warm-up starts (a clock all
 * processes of the machine share); the JSON line then carries the window it timed
 * (window_start_ns, window_end_ns) on that clock.
 *
 * --cold instead measures a cold start in this fresh process: the wall time from just
 * before C_Initialize to the return of the first successful C_Sign (slot lookup,
 * C_OpenSession, C_Login, C_FindObjects and C_SignInit included), each step's share,
 * and then the latency of --next more signatures on the now open session.  A failure
 * before the last signature is fatal (exit 1, no JSON line): a cold start works or not;
 * teardown failures are counted in "errors" as in a steady-state run.
 *
 * Build: cc -O2 -Wall -Wextra -Werror -pthread -I/usr/include/p11-kit-1 \
 *           -o p11bench p11bench.c -ldl
 *
 * Usage: p11bench --module PATH --token LABEL --pin PIN --key LABEL --mech rsa|ec
 *                 [--threads N] [--seconds S] [--warmup S] [--max-ops N] [--sync]
 *        p11bench --cold [--next N] --module PATH --token LABEL --pin PIN --key LABEL
 *                 --mech rsa|ec
 *
 * Exit status: 0 when the run completed (errors, if any, are in the JSON line),
 * 2 on bad usage, 1 when setup failed (no JSON line is printed then).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <p11-kit/pkcs11.h>

#define MAX_THREADS 64
#define MAX_SLOTS 64
#define MAX_SEEN_ERRORS 32
#define SIG_BUF_MAX 1024
/* --sync: a start time further away than this is refused (a bounded wait). */
#define SYNC_MAX_WAIT_NS (60ULL * 1000000000ULL)

/* A fixed SHA-256 DigestInfo (19-byte DER prefix + 32-byte hash = 51 bytes). */
static const CK_BYTE RSA_DIGEST_INFO[51] = {
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04,
    0x02, 0x01, 0x05, 0x00, 0x04, 0x20,
    0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d,
    0xae, 0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10,
    0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
};

/* A fixed 32-byte hash (SHA-256 of "abc") for CKM_ECDSA. */
static const CK_BYTE EC_HASH[32] = {
    0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40, 0xde, 0x5d,
    0xae, 0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17, 0x7a, 0x9c, 0xb4, 0x10,
    0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
};

struct options {
    const char *module;
    const char *token;
    const char *pin;
    const char *key;
    const char *mech;
    int threads;
    double seconds;
    double warmup;
    long max_ops;
    int cold;   /* measure the cold start instead of a steady-state run */
    int sync;   /* --sync: print "ready", then start at the CLOCK_MONOTONIC ns read on stdin */
    long next;  /* --cold: signatures timed after the first one */
};

struct worker {
    pthread_t thread;
    int index;
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE key;
    CK_ULONG sig_len;
    uint64_t *lat_ns;   /* latencies of timed, successful ops */
    long lat_cap;       /* capacity of lat_ns (= max timed ops for this thread) */
    long ops;           /* timed, successful ops */
    long errors;        /* non-CKR_OK results during warm-up and timing */
    uint64_t timed_start; /* monotonic ns when this thread's timed phase began */
    uint64_t last_end;    /* monotonic ns at the end of the last timed op */
};

static CK_FUNCTION_LIST_PTR p11;
static CK_MECHANISM mechanism;
static const CK_BYTE *sign_data;
static CK_ULONG sign_data_len;
static uint64_t warm_end_ns;  /* warm-up ends here (or earlier, when its op budget is spent) */
static uint64_t stop_ns;      /* timing stops here */
static pthread_barrier_t start_barrier;
static uint64_t start_ns;

static pthread_mutex_t seen_lock = PTHREAD_MUTEX_INITIALIZER;
static CK_RV seen_codes[MAX_SEEN_ERRORS];
static int seen_count;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Print each distinct error code once on stderr. */
static void report_error(const char *what, CK_RV rv)
{
    int i, seen = 0;
    pthread_mutex_lock(&seen_lock);
    for (i = 0; i < seen_count; i++) {
        if (seen_codes[i] == rv) {
            seen = 1;
            break;
        }
    }
    if (!seen && seen_count < MAX_SEEN_ERRORS)
        seen_codes[seen_count++] = rv;
    pthread_mutex_unlock(&seen_lock);
    if (!seen)
        fprintf(stderr, "p11bench: %s failed: CKR 0x%08lx\n", what, (unsigned long)rv);
}

static void die_rv(const char *what, CK_RV rv)
{
    fprintf(stderr, "p11bench: %s failed: CKR 0x%08lx\n", what, (unsigned long)rv);
    exit(1);
}

static void usage(void)
{
    fprintf(stderr,
            "usage: p11bench --module PATH --token LABEL --pin PIN --key LABEL --mech rsa|ec\n"
            "                [--threads N] [--seconds S] [--warmup S] [--max-ops N] [--sync]\n"
            "       p11bench --cold [--next N] --module PATH --token LABEL --pin PIN\n"
            "                --key LABEL --mech rsa|ec\n");
    exit(2);
}

static long parse_long(const char *s, long lo, long hi)
{
    char *end;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        usage();
    return v;
}

static double parse_double(const char *s, double lo, double hi)
{
    char *end;
    double v;
    errno = 0;
    v = strtod(s, &end);
    if (errno || *end || end == s || !(v >= lo && v <= hi))
        usage();
    return v;
}

static void parse_args(int argc, char **argv, struct options *o)
{
    int i;
    memset(o, 0, sizeof(*o));
    o->threads = 1;
    o->seconds = 3.0;
    o->warmup = 0.3;
    o->max_ops = 1000000;
    o->next = 20;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = (i + 1 < argc) ? argv[i + 1] : NULL;
        if (!strcmp(a, "--cold")) {  /* the options without a value */
            o->cold = 1;
            continue;
        }
        if (!strcmp(a, "--sync")) {
            o->sync = 1;
            continue;
        }
        if (!v)
            usage();
        if (!strcmp(a, "--module"))
            o->module = v;
        else if (!strcmp(a, "--token"))
            o->token = v;
        else if (!strcmp(a, "--pin"))
            o->pin = v;
        else if (!strcmp(a, "--key"))
            o->key = v;
        else if (!strcmp(a, "--mech"))
            o->mech = v;
        else if (!strcmp(a, "--threads"))
            o->threads = (int)parse_long(v, 1, MAX_THREADS);
        else if (!strcmp(a, "--seconds"))
            o->seconds = parse_double(v, 0.01, 600.0);
        else if (!strcmp(a, "--warmup"))
            o->warmup = parse_double(v, 0.0, 60.0);
        else if (!strcmp(a, "--max-ops"))
            o->max_ops = parse_long(v, 1, 100000000);
        else if (!strcmp(a, "--next"))
            o->next = parse_long(v, 0, 100000);
        else
            usage();
        i++;
    }
    if (!o->module || !o->token || !o->pin || !o->key || !o->mech)
        usage();
    if (strcmp(o->mech, "rsa") && strcmp(o->mech, "ec"))
        usage();
    if (o->cold && o->sync)
        usage();
}

/* --sync: say "ready", read the start time (CLOCK_MONOTONIC ns) from stdin, sleep until
 * then.  A start already past begins at once; no line, a bad one or one too far ahead is
 * fatal (exit 1): the caller's windows would not line up. */
static uint64_t wait_for_start(void)
{
    char line[64];
    char *end;
    unsigned long long start;
    uint64_t now;
    struct timespec ts;

    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin)) {
        fprintf(stderr, "p11bench: --sync: no start time on stdin\n");
        exit(1);
    }
    errno = 0;
    start = strtoull(line, &end, 10);
    if (errno || end == line || (*end != '\n' && *end != '\0')) {
        fprintf(stderr, "p11bench: --sync: bad start time '%s'\n", line);
        exit(1);
    }
    now = now_ns();
    if (start > now + SYNC_MAX_WAIT_NS) {
        fprintf(stderr, "p11bench: --sync: start time is more than 60 s away\n");
        exit(1);
    }
    if (start > now) {
        ts.tv_sec = (time_t)(start / 1000000000ULL);
        ts.tv_nsec = (long)(start % 1000000000ULL);
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;
    }
    return now_ns();
}

/* Compare a blank-padded 32-byte token label with a C string. */
static int label_matches(const CK_UTF8CHAR label[32], const char *want)
{
    size_t n = 32;
    while (n > 0 && (label[n - 1] == ' ' || label[n - 1] == '\0'))
        n--;
    return strlen(want) == n && memcmp(label, want, n) == 0;
}

static CK_SLOT_ID find_slot(const char *token)
{
    CK_SLOT_ID slots[MAX_SLOTS];
    CK_ULONG count = MAX_SLOTS, i;
    CK_RV rv = p11->C_GetSlotList(CK_TRUE, slots, &count);
    if (rv != CKR_OK)
        die_rv("C_GetSlotList", rv);
    for (i = 0; i < count && i < MAX_SLOTS; i++) {
        CK_TOKEN_INFO info;
        rv = p11->C_GetTokenInfo(slots[i], &info);
        if (rv != CKR_OK)
            die_rv("C_GetTokenInfo", rv);
        if (label_matches(info.label, token))
            return slots[i];
    }
    fprintf(stderr, "p11bench: no token labelled '%s' among %lu slot(s)\n", token,
            (unsigned long)count);
    exit(1);
}

static CK_OBJECT_HANDLE find_key(CK_SESSION_HANDLE s, const char *label)
{
    CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
    CK_ATTRIBUTE tmpl[2];
    CK_OBJECT_HANDLE found[2];
    CK_ULONG n = 0;
    CK_RV rv;

    tmpl[0].type = CKA_CLASS;
    tmpl[0].pValue = &cls;
    tmpl[0].ulValueLen = sizeof(cls);
    tmpl[1].type = CKA_LABEL;
    tmpl[1].pValue = (void *)label;
    tmpl[1].ulValueLen = (CK_ULONG)strlen(label);

    rv = p11->C_FindObjectsInit(s, tmpl, 2);
    if (rv != CKR_OK)
        die_rv("C_FindObjectsInit", rv);
    rv = p11->C_FindObjects(s, found, 2, &n);
    if (rv != CKR_OK)
        die_rv("C_FindObjects", rv);
    rv = p11->C_FindObjectsFinal(s);
    if (rv != CKR_OK)
        die_rv("C_FindObjectsFinal", rv);
    if (n == 0) {
        fprintf(stderr, "p11bench: no private key labelled '%s'\n", label);
        exit(1);
    }
    if (n > 1)
        fprintf(stderr, "p11bench: warning: several keys labelled '%s'; using the first\n",
                label);
    return found[0];
}

/* Query the signature length once and complete that operation with a real signature. */
static CK_ULONG query_sig_len(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key)
{
    CK_BYTE sig[SIG_BUF_MAX];
    CK_ULONG len = 0;
    CK_RV rv = p11->C_SignInit(s, &mechanism, key);
    if (rv != CKR_OK)
        die_rv("C_SignInit (length query)", rv);
    rv = p11->C_Sign(s, (CK_BYTE_PTR)sign_data, sign_data_len, NULL, &len);
    if (rv != CKR_OK)
        die_rv("C_Sign (length query)", rv);
    if (len == 0 || len > SIG_BUF_MAX) {
        fprintf(stderr, "p11bench: unexpected signature length %lu\n", (unsigned long)len);
        exit(1);
    }
    rv = p11->C_Sign(s, (CK_BYTE_PTR)sign_data, sign_data_len, sig, &len);
    if (rv != CKR_OK)
        die_rv("C_Sign (first signature)", rv);
    return len;
}

/* One signature; returns CKR_OK or the first failing code. */
static CK_RV sign_once(struct worker *w, CK_BYTE *sig)
{
    CK_ULONG len = w->sig_len;
    CK_RV rv = p11->C_SignInit(w->session, &mechanism, w->key);
    if (rv != CKR_OK) {
        report_error("C_SignInit", rv);
        return rv;
    }
    rv = p11->C_Sign(w->session, (CK_BYTE_PTR)sign_data, sign_data_len, sig, &len);
    if (rv != CKR_OK) {
        report_error("C_Sign", rv);
        return rv;
    }
    return CKR_OK;
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    CK_BYTE sig[SIG_BUF_MAX];
    long warm_ops = 0;
    uint64_t t;

    pthread_barrier_wait(&start_barrier);

    /* Warm-up: bounded by time and by the same op budget as the timed phase. */
    while (warm_ops < w->lat_cap && now_ns() < warm_end_ns) {
        if (sign_once(w, sig) != CKR_OK)
            w->errors++;
        warm_ops++;
    }
    /* Timed phase: ops that start before stop_ns, at most lat_cap of them. */
    w->timed_start = now_ns();
    w->last_end = w->timed_start;
    while (w->ops < w->lat_cap) {
        uint64_t t0 = now_ns();
        if (t0 >= stop_ns)
            break;
        if (sign_once(w, sig) != CKR_OK) {
            w->errors++;
            w->last_end = now_ns();
            continue;
        }
        t = now_ns();
        w->lat_ns[w->ops++] = t - t0;
        w->last_end = t;
    }
    return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array, in microseconds. */
static double percentile_us(const uint64_t *sorted, long n, double p)
{
    long rank;
    if (n <= 0)
        return 0.0;
    rank = (long)(p / 100.0 * (double)n + 0.999999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)sorted[rank - 1] / 1000.0;
}

static void print_json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static double ms_between(uint64_t from, uint64_t to)
{
    return (double)(to - from) / 1e6;
}

/* --cold: one cold start in this process, then --next signatures on its session. */
static int cold_start(const struct options *o, double dlopen_ms)
{
    CK_C_INITIALIZE_ARGS init_args;
    CK_SESSION_HANDLE session;
    CK_OBJECT_HANDLE key;
    CK_SLOT_ID slot;
    CK_BYTE sig[SIG_BUF_MAX];
    CK_ULONG len = sizeof(sig);
    uint64_t t[8], t0, *lat;
    long i, errors = 0;
    CK_RV rv;

    lat = calloc((size_t)(o->next > 0 ? o->next : 1), sizeof(uint64_t));
    if (!lat) {
        fprintf(stderr, "p11bench: out of memory\n");
        return 1;
    }
    memset(&init_args, 0, sizeof(init_args));
    init_args.flags = CKF_OS_LOCKING_OK;

    t[0] = now_ns();
    rv = p11->C_Initialize(&init_args);
    if (rv != CKR_OK)
        die_rv("C_Initialize", rv);
    t[1] = now_ns();
    slot = find_slot(o->token);
    t[2] = now_ns();
    rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &session);
    if (rv != CKR_OK)
        die_rv("C_OpenSession", rv);
    t[3] = now_ns();
    rv = p11->C_Login(session, CKU_USER, (CK_UTF8CHAR_PTR)o->pin, (CK_ULONG)strlen(o->pin));
    if (rv != CKR_OK)
        die_rv("C_Login", rv);
    t[4] = now_ns();
    key = find_key(session, o->key);
    t[5] = now_ns();
    rv = p11->C_SignInit(session, &mechanism, key);
    if (rv != CKR_OK)
        die_rv("C_SignInit", rv);
    t[6] = now_ns();
    /* No length query: the buffer is large enough, as a caller that knows its key does. */
    rv = p11->C_Sign(session, (CK_BYTE_PTR)sign_data, sign_data_len, sig, &len);
    if (rv != CKR_OK)
        die_rv("C_Sign", rv);
    t[7] = now_ns();

    /* What an operation costs once the session is open, in the same process. */
    for (i = 0; i < o->next; i++) {
        len = sizeof(sig);
        t0 = now_ns();
        rv = p11->C_SignInit(session, &mechanism, key);
        if (rv == CKR_OK)
            rv = p11->C_Sign(session, (CK_BYTE_PTR)sign_data, sign_data_len, sig, &len);
        if (rv != CKR_OK)
            die_rv("C_SignInit/C_Sign (after the first)", rv);
        lat[i] = now_ns() - t0;
    }
    qsort(lat, (size_t)o->next, sizeof(uint64_t), cmp_u64);

    rv = p11->C_Logout(session);
    if (rv != CKR_OK) {
        report_error("C_Logout", rv);
        errors++;
    }
    rv = p11->C_CloseSession(session);
    if (rv != CKR_OK) {
        report_error("C_CloseSession", rv);
        errors++;
    }
    rv = p11->C_Finalize(NULL);
    if (rv != CKR_OK) {
        report_error("C_Finalize", rv);
        errors++;
    }

    printf("{\"mode\": \"cold\", \"module\": ");
    print_json_string(o->module);
    printf(", \"mech\": ");
    print_json_string(o->mech);
    printf(", \"dlopen_ms\": %.3f, \"initialize_ms\": %.3f, \"slot_ms\": %.3f"
           ", \"open_session_ms\": %.3f, \"login_ms\": %.3f, \"find_key_ms\": %.3f"
           ", \"sign_init_ms\": %.3f, \"sign_ms\": %.3f, \"cold_ms\": %.3f"
           ", \"next_ops\": %ld, \"next_p50_us\": %.1f, \"next_max_us\": %.1f"
           ", \"errors\": %ld}\n",
           dlopen_ms, ms_between(t[0], t[1]), ms_between(t[1], t[2]), ms_between(t[2], t[3]),
           ms_between(t[3], t[4]), ms_between(t[4], t[5]), ms_between(t[5], t[6]),
           ms_between(t[6], t[7]), ms_between(t[0], t[7]), o->next,
           percentile_us(lat, o->next, 50.0), percentile_us(lat, o->next, 100.0), errors);
    fflush(stdout);
    free(lat);
    return 0;
}

int main(int argc, char **argv)
{
    struct options o;
    struct worker workers[MAX_THREADS];
    CK_C_GetFunctionList get_list;
    CK_C_INITIALIZE_ARGS init_args;
    CK_SLOT_ID slot;
    void *lib;
    CK_RV rv;
    int i;
    long per_thread, total_ops = 0, total_errors = 0, k;
    uint64_t begin_ns = UINT64_MAX, end_ns = 0, *all;
    double elapsed;
    uint64_t dlopen_start;

    parse_args(argc, argv, &o);

    if (!strcmp(o.mech, "rsa")) {
        mechanism.mechanism = CKM_RSA_PKCS;
        sign_data = RSA_DIGEST_INFO;
        sign_data_len = sizeof(RSA_DIGEST_INFO);
    } else {
        mechanism.mechanism = CKM_ECDSA;
        sign_data = EC_HASH;
        sign_data_len = sizeof(EC_HASH);
    }
    mechanism.pParameter = NULL;
    mechanism.ulParameterLen = 0;

    dlopen_start = now_ns();
    lib = dlopen(o.module, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "p11bench: dlopen %s: %s\n", o.module, dlerror());
        return 1;
    }
    *(void **)(&get_list) = dlsym(lib, "C_GetFunctionList");
    if (!get_list) {
        fprintf(stderr, "p11bench: %s has no C_GetFunctionList\n", o.module);
        return 1;
    }
    rv = get_list(&p11);
    if (rv != CKR_OK)
        die_rv("C_GetFunctionList", rv);
    if (o.cold)  /* loading the library is reported apart: the target starts at C_Initialize */
        return cold_start(&o, ms_between(dlopen_start, now_ns()));

    memset(&init_args, 0, sizeof(init_args));
    init_args.flags = CKF_OS_LOCKING_OK;
    rv = p11->C_Initialize(&init_args);
    if (rv != CKR_OK)
        die_rv("C_Initialize", rv);

    slot = find_slot(o.token);

    per_thread = o.max_ops / o.threads;
    if (per_thread < 1)
        per_thread = 1;

    memset(workers, 0, sizeof(workers));
    for (i = 0; i < o.threads; i++) {
        struct worker *w = &workers[i];
        w->index = i;
        rv = p11->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &w->session);
        if (rv != CKR_OK)
            die_rv("C_OpenSession", rv);
        /* Login state is per application; later sessions may already be logged in. */
        rv = p11->C_Login(w->session, CKU_USER, (CK_UTF8CHAR_PTR)o.pin,
                          (CK_ULONG)strlen(o.pin));
        if (rv != CKR_OK && !(i > 0 && rv == CKR_USER_ALREADY_LOGGED_IN))
            die_rv("C_Login", rv);
        w->key = find_key(w->session, o.key);
        w->sig_len = query_sig_len(w->session, w->key);
        w->lat_cap = per_thread;
        w->lat_ns = calloc((size_t)per_thread, sizeof(uint64_t));
        if (!w->lat_ns) {
            fprintf(stderr, "p11bench: out of memory\n");
            return 1;
        }
    }

    if (pthread_barrier_init(&start_barrier, NULL, (unsigned)o.threads + 1) != 0) {
        fprintf(stderr, "p11bench: pthread_barrier_init failed\n");
        return 1;
    }
    for (i = 0; i < o.threads; i++) {
        if (pthread_create(&workers[i].thread, NULL, worker_main, &workers[i]) != 0) {
            fprintf(stderr, "p11bench: pthread_create failed\n");
            return 1;
        }
    }
    start_ns = o.sync ? wait_for_start() : now_ns();
    warm_end_ns = start_ns + (uint64_t)(o.warmup * 1e9);
    stop_ns = warm_end_ns + (uint64_t)(o.seconds * 1e9);
    /* The barrier publishes warm_end_ns/stop_ns to the workers. */
    pthread_barrier_wait(&start_barrier);
    for (i = 0; i < o.threads; i++)
        pthread_join(workers[i].thread, NULL);
    pthread_barrier_destroy(&start_barrier);

    for (i = 0; i < o.threads; i++) {
        total_ops += workers[i].ops;
        total_errors += workers[i].errors;
        if (workers[i].timed_start < begin_ns)
            begin_ns = workers[i].timed_start;
        if (workers[i].last_end > end_ns)
            end_ns = workers[i].last_end;
    }
    /* The measured window: first thread entering the timed phase to last op ending. */
    elapsed = end_ns > begin_ns ? (double)(end_ns - begin_ns) / 1e9 : 0.0;

    all = malloc((size_t)(total_ops > 0 ? total_ops : 1) * sizeof(uint64_t));
    if (!all) {
        fprintf(stderr, "p11bench: out of memory\n");
        return 1;
    }
    k = 0;
    for (i = 0; i < o.threads; i++) {
        memcpy(all + k, workers[i].lat_ns, (size_t)workers[i].ops * sizeof(uint64_t));
        k += workers[i].ops;
    }
    qsort(all, (size_t)total_ops, sizeof(uint64_t), cmp_u64);

    /* Tear down; failures here count as errors too. */
    rv = p11->C_Logout(workers[0].session);
    if (rv != CKR_OK && rv != CKR_USER_NOT_LOGGED_IN) {
        report_error("C_Logout", rv);
        total_errors++;
    }
    for (i = 0; i < o.threads; i++) {
        rv = p11->C_CloseSession(workers[i].session);
        if (rv != CKR_OK) {
            report_error("C_CloseSession", rv);
            total_errors++;
        }
        free(workers[i].lat_ns);
    }
    rv = p11->C_Finalize(NULL);
    if (rv != CKR_OK) {
        report_error("C_Finalize", rv);
        total_errors++;
    }

    printf("{\"module\": ");
    print_json_string(o.module);
    printf(", \"mech\": ");
    print_json_string(o.mech);
    printf(", \"threads\": %d, \"ops\": %ld, \"seconds\": %.4f, \"ops_per_s\": %.2f"
           ", \"p50_us\": %.1f, \"p99_us\": %.1f, \"errors\": %ld"
           ", \"window_start_ns\": %llu, \"window_end_ns\": %llu}\n",
           o.threads, total_ops, elapsed, elapsed > 0 ? (double)total_ops / elapsed : 0.0,
           percentile_us(all, total_ops, 50.0), percentile_us(all, total_ops, 99.0),
           total_errors, (unsigned long long)begin_ns, (unsigned long long)end_ns);
    fflush(stdout);
    free(all);
    /* Deliberately no dlclose(): an embedded interpreter may not survive unloading. */
    return 0;
}
