/*
 * p11grid: the C edge of the PKCS#11 module.
 *
 * Everything PKCS#11 means is decided in Python (provider/); this file only
 *  - exports the 2.40 function list and the 3.0 "PKCS 11" interface,
 *  - promotes libpython to RTLD_GLOBAL before the interpreter starts,
 *  - starts the interpreter itself in a C host, with the virtualenv's site-packages on
 *    sys.path, because cffi imports _cffi_backend before any of our Python runs,
 *  - refuses every call with CKR_GENERAL_ERROR when Python could not start
 *    (cffi would otherwise return 0, which is CKR_OK),
 *  - keeps the interpreter consistent across fork() and makes a child answer
 *    CKR_CRYPTOKI_NOT_INITIALIZED until it calls C_Initialize itself,
 *  - waits for a socket to become readable without sleeping and without the GIL, for
 *    the grid client's short wait for a reply (p11grid_native_await_readable).
 */
#define _GNU_SOURCE
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <p11-kit/pkcs11.h>

#include "entry_points.h"
#include "python_callbacks.h"

#define P11GRID_EXPORT __attribute__((visibility("default")))

#ifndef P11GRID_SITE_PACKAGES
#error "build.py defines P11GRID_SITE_PACKAGES: the virtualenv's site-packages, ':'-separated"
#endif
#ifndef P11GRID_PYTHON
#error "build.py defines P11GRID_PYTHON: the interpreter libpython belongs to"
#endif

/* Value p11grid_py_alive() returns once Python runs our code. */
#define P11GRID_ALIVE_MAGIC 0x70313167UL

enum python_state { PYTHON_UNKNOWN = 0, PYTHON_RUNNING = 1, PYTHON_FAILED = 2 };

static atomic_int python_state = PYTHON_UNKNOWN;
/* 1 between a successful C_Initialize and C_Finalize in this process. */
static atomic_int module_initialized = 0;
/* 1 when this library started the interpreter (C host such as nginx). */
static atomic_int owns_interpreter = 0;
static pthread_once_t start_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;

/* --- fork ---------------------------------------------------------------- */

static PyGILState_STATE fork_gil;
static int fork_holds_gil = 0;

static void before_fork(void)
{
    fork_holds_gil = 0;
    /* A Python host forks through os.fork(), which does this itself. */
    if (atomic_load(&owns_interpreter) && Py_IsInitialized()) {
        fork_gil = PyGILState_Ensure();
        PyOS_BeforeFork();
        fork_holds_gil = 1;
    }
}

static void after_fork_parent(void)
{
    if (fork_holds_gil) {
        PyOS_AfterFork_Parent();
        PyGILState_Release(fork_gil);
        fork_holds_gil = 0;
    }
}

static void after_fork_child(void)
{
    /* PKCS#11: the child starts uninitialized and must call C_Initialize. */
    atomic_store(&module_initialized, 0);
    if (fork_holds_gil) {
        PyOS_AfterFork_Child();
        PyGILState_Release(fork_gil);
        fork_holds_gil = 0;
    }
}

/* --- interpreter start ---------------------------------------------------- */

/*
 * A host that dlopen()s us with RTLD_LOCAL hides libpython's symbols from the
 * C extension modules Python imports later; re-open it RTLD_GLOBAL first.
 */
static void promote_libpython(void)
{
    Dl_info info;
    if (dladdr((void *)&Py_IsInitialized, &info) == 0 || info.dli_fname == NULL)
        return;
    void *self = dlopen(NULL, RTLD_NOW);
    void *owner = dlopen(info.dli_fname, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
    if (owner != NULL && owner != self)
        return; /* stays open on purpose: the interpreter lives as long as the process */
    if (owner != NULL)
        dlclose(owner);
}

/*
 * In a C host (nginx, openssl, pkcs11-tool) nobody has started Python yet. Starting it
 * here lets the virtualenv's site-packages go first on sys.path before cffi imports its
 * _cffi_backend from there; a system copy of another version must not win. A Python host
 * keeps its own interpreter and sys.path (our init code only appends to it).
 */
static int start_interpreter(void)
{
    if (Py_IsInitialized())
        return 1;
    atomic_store(&owns_interpreter, 1);
    /*
     * Isolated: the host's PYTHONPATH/PYTHONHOME are not ours. The program name is the
     * interpreter recorded at build time, so the standard library is found from it and
     * not from whatever `python3` comes first on the host's PATH.
     */
    PyConfig config;
    PyConfig_InitIsolatedConfig(&config);
    config.install_signal_handlers = 0; /* the host owns its signal handlers */
    PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, P11GRID_PYTHON);
    if (!PyStatus_Exception(status))
        status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        fprintf(stderr, "p11grid: Python could not start: %s\n",
                status.err_msg != NULL ? status.err_msg : "unknown error");
        return 0;
    }
    const char *chosen = getenv("P11GRID_SITE_PACKAGES");
    if (chosen == NULL || chosen[0] == '\0')
        chosen = P11GRID_SITE_PACKAGES;
    PyObject *path = PySys_GetObject("path"); /* borrowed */
    Py_ssize_t position = 0;
    for (const char *start = chosen; path != NULL && *start != '\0';) {
        const char *end = strchr(start, ':');
        size_t length = end != NULL ? (size_t)(end - start) : strlen(start);
        if (length > 0) {
            PyObject *entry = PyUnicode_DecodeFSDefaultAndSize(start, (Py_ssize_t)length);
            if (entry == NULL || PyList_Insert(path, position++, entry) != 0)
                PyErr_Clear();
            Py_XDECREF(entry);
        }
        start += length + (end != NULL ? 1 : 0);
    }
    PyEval_SaveThread(); /* cffi and every later call take the GIL when they need it */
    return 1;
}

static int interpreter_started = 0;

static void start_once_fn(void)
{
    promote_libpython();
    interpreter_started = start_interpreter();
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}

static CK_RV ensure_python(void)
{
    int state = atomic_load(&python_state);
    if (state == PYTHON_RUNNING)
        return CKR_OK;
    if (state == PYTHON_FAILED)
        return CKR_GENERAL_ERROR;
    pthread_once(&start_once, start_once_fn);
    pthread_mutex_lock(&start_lock);
    if (!interpreter_started) {
        atomic_store(&python_state, PYTHON_FAILED);
    } else if (atomic_load(&python_state) == PYTHON_UNKNOWN) {
        /* cffi starts Python on this first call; it returns 0 if that failed. */
        if (p11grid_py_alive() == P11GRID_ALIVE_MAGIC) {
            atomic_store(&python_state, PYTHON_RUNNING);
        } else {
            atomic_store(&python_state, PYTHON_FAILED);
            fprintf(stderr, "p11grid: the embedded Python could not start (see the traceback "
                            "above); every PKCS#11 call answers CKR_GENERAL_ERROR\n");
        }
    }
    pthread_mutex_unlock(&start_lock);
    return atomic_load(&python_state) == PYTHON_RUNNING ? CKR_OK : CKR_GENERAL_ERROR;
}

/* Called from Python: did this library start the interpreter? */
int p11grid_native_owns_interpreter(void)
{
    return atomic_load(&owns_interpreter);
}

/* Called from Python after its own C_Initialize/C_Finalize succeeded. */
void p11grid_native_set_initialized(int initialized)
{
    atomic_store(&module_initialized, initialized ? 1 : 0);
}

/*
 * Polls `fd` until it is readable or `spin_us` microseconds have passed; 1: readable (or
 * closed, or in error: the read that follows says which), 0: not within the time, -1: not
 * an open descriptor, or poll failed. Called from Python through cffi, which
 * releases the GIL around it, so several threads may wait at once. A reply that finds
 * its reader asleep costs the sender a cross-CPU wake-up; a reader that yields instead of
 * sleeping lets any other runnable thread on its CPU go first (bench/analysis.md).
 */
int p11grid_native_await_readable(int fd, long spin_us)
{
    struct pollfd watched = { .fd = fd, .events = POLLIN };
    struct timespec start, now;
    if (fd < 0 || spin_us <= 0)
        return 0;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        int ready = poll(&watched, 1, 0);
        if (ready > 0)
            return (watched.revents & POLLNVAL) ? -1 : 1;
        if (ready < 0 && errno != EINTR)
            return -1;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long waited_us = (long)(now.tv_sec - start.tv_sec) * 1000000L
                         + (now.tv_nsec - start.tv_nsec) / 1000L;
        if (waited_us >= spin_us)
            return 0;
        sched_yield();
    }
}

static CK_RV enter(void)
{
    CK_RV rv = ensure_python();
    if (rv != CKR_OK)
        return rv;
    if (!atomic_load(&module_initialized))
        return CKR_CRYPTOKI_NOT_INITIALIZED;
    return CKR_OK;
}

/* --- the entry points ----------------------------------------------------- */

P11GRID_EXPORT CK_RV C_Initialize(CK_VOID_PTR pInitArgs)
{
    CK_RV rv = ensure_python();
    if (rv != CKR_OK)
        return rv;
    return p11grid_py_C_Initialize(pInitArgs);
}

#define DEFINE_SERVED(name, params, args)                                                     \
    P11GRID_EXPORT CK_RV name params                                                          \
    {                                                                                         \
        CK_RV rv = enter();                                                                   \
        if (rv != CKR_OK)                                                                     \
            return rv;                                                                        \
        return p11grid_py_##name args;                                                        \
    }

/* Parameters are part of the ABI but unused here. */
#define DEFINE_REFUSED(name, params, refusal)                                                 \
    _Pragma("GCC diagnostic push")                                                            \
    _Pragma("GCC diagnostic ignored \"-Wunused-parameter\"")                                  \
    P11GRID_EXPORT CK_RV name params                                                          \
    {                                                                                         \
        CK_RV rv = enter();                                                                   \
        return rv != CKR_OK ? rv : (refusal);                                                 \
    }                                                                                         \
    _Pragma("GCC diagnostic pop")

P11GRID_ENTRY_POINTS(DEFINE_SERVED, DEFINE_REFUSED)

#define DEFINE_REFUSED_3_0(name, params)                                                      \
    _Pragma("GCC diagnostic push")                                                            \
    _Pragma("GCC diagnostic ignored \"-Wunused-parameter\"")                                  \
    static CK_RV refused_##name params                                                        \
    {                                                                                         \
        CK_RV rv = enter();                                                                   \
        return rv != CKR_OK ? rv : CKR_FUNCTION_NOT_SUPPORTED;                                \
    }                                                                                         \
    _Pragma("GCC diagnostic pop")

P11GRID_ENTRY_POINTS_3_0(DEFINE_REFUSED_3_0)

/* --- function lists and interfaces --------------------------------------- */

#define LIST_SERVED(name, params, args) .name = name,
#define LIST_REFUSED(name, params, refusal) .name = name,

static CK_FUNCTION_LIST function_list_2_40 = {
    .version = {2, 40},
    .C_Initialize = C_Initialize,
    .C_GetFunctionList = C_GetFunctionList,
    P11GRID_ENTRY_POINTS(LIST_SERVED, LIST_REFUSED)
};

/*
 * Debian 12's p11-kit header predates PKCS#11 3.0, so the 3.0 interface types
 * are spelled out here with the layout the 3.0 specification fixes.
 */
struct p11grid_interface {
    CK_UTF8CHAR *pInterfaceName;
    CK_VOID_PTR pFunctionList;
    CK_FLAGS flags;
};

#define FIELD_2_40_SERVED(name, params, args) CK_RV (*name) params;
#define FIELD_2_40_REFUSED(name, params, refusal) CK_RV (*name) params;
#define FIELD_3_0(name, params) CK_RV (*name) params;

struct p11grid_function_list_3_0 {
    CK_VERSION version;
    CK_RV (*C_Initialize)(CK_VOID_PTR);
    CK_RV (*C_Finalize)(CK_VOID_PTR);
    CK_RV (*C_GetInfo)(CK_INFO_PTR);
    CK_RV (*C_GetFunctionList)(CK_FUNCTION_LIST_PTR_PTR);
    /* The rest of the 2.40 list, in order, from the table minus the first two. */
    P11GRID_ENTRY_POINTS_AFTER_GETINFO(FIELD_2_40_SERVED, FIELD_2_40_REFUSED)
    CK_RV (*C_GetInterfaceList)(struct p11grid_interface *, CK_ULONG_PTR);
    CK_RV (*C_GetInterface)(CK_UTF8CHAR_PTR, CK_VERSION *, struct p11grid_interface **, CK_FLAGS);
    P11GRID_ENTRY_POINTS_3_0(FIELD_3_0)
};

CK_RV p11grid_get_interface_list(struct p11grid_interface *pInterfacesList, CK_ULONG_PTR pulCount)
    __asm__("C_GetInterfaceList");
CK_RV p11grid_get_interface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION *pVersion,
                            struct p11grid_interface **ppInterface, CK_FLAGS flags)
    __asm__("C_GetInterface");

#define LIST_3_0(name, params) .name = refused_##name,

static struct p11grid_function_list_3_0 function_list_3_0 = {
    .version = {3, 0},
    .C_Initialize = C_Initialize,
    .C_Finalize = C_Finalize,
    .C_GetInfo = C_GetInfo,
    .C_GetFunctionList = C_GetFunctionList,
    P11GRID_ENTRY_POINTS_AFTER_GETINFO(LIST_SERVED, LIST_REFUSED)
    .C_GetInterfaceList = p11grid_get_interface_list,
    .C_GetInterface = p11grid_get_interface,
    P11GRID_ENTRY_POINTS_3_0(LIST_3_0)
};

static CK_UTF8CHAR interface_name[] = "PKCS 11";

static struct p11grid_interface interfaces[] = {
    {interface_name, &function_list_3_0, 0},
    {interface_name, &function_list_2_40, 0},
};
#define INTERFACE_COUNT (sizeof(interfaces) / sizeof(interfaces[0]))

P11GRID_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
    if (ppFunctionList == NULL)
        return CKR_ARGUMENTS_BAD;
    *ppFunctionList = &function_list_2_40;
    return CKR_OK;
}

P11GRID_EXPORT CK_RV p11grid_get_interface_list(struct p11grid_interface *pInterfacesList,
                                                CK_ULONG_PTR pulCount)
{
    if (pulCount == NULL)
        return CKR_ARGUMENTS_BAD;
    if (pInterfacesList == NULL) {
        *pulCount = INTERFACE_COUNT;
        return CKR_OK;
    }
    if (*pulCount < INTERFACE_COUNT) {
        *pulCount = INTERFACE_COUNT;
        return CKR_BUFFER_TOO_SMALL;
    }
    memcpy(pInterfacesList, interfaces, sizeof(interfaces));
    *pulCount = INTERFACE_COUNT;
    return CKR_OK;
}

P11GRID_EXPORT CK_RV p11grid_get_interface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION *pVersion,
                                           struct p11grid_interface **ppInterface, CK_FLAGS flags)
{
    if (ppInterface == NULL)
        return CKR_ARGUMENTS_BAD;
    if (flags != 0)
        return CKR_ARGUMENTS_BAD; /* we offer no fork-safe interface variant */
    if (pInterfaceName != NULL && strcmp((const char *)pInterfaceName, "PKCS 11") != 0)
        return CKR_ARGUMENTS_BAD;
    for (size_t i = 0; i < INTERFACE_COUNT; i++) {
        CK_VERSION *offered = (CK_VERSION *)interfaces[i].pFunctionList;
        if (pVersion == NULL ||
            (pVersion->major == offered->major && pVersion->minor == offered->minor)) {
            *ppInterface = &interfaces[i];
            return CKR_OK;
        }
    }
    return CKR_ARGUMENTS_BAD;
}
