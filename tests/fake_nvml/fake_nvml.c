/*
 * A fake libnvidia-ml.so.1 for the test suite: the subset of NVML entry points that
 * probes/nvidia.py reaches through the real pynvml module.
 *
 * Why C and not a monkeypatched pynvml: pynvml hands ctypes structures to the library by
 * pointer, so only a real shared object proves that our calls and pynvml's structure
 * layouts agree (nvmlPciInfo_t, nvmlMemory_t, nvmlMemory_v2_t with its version word, ...).
 * Layouts and signatures follow nvml.h as mirrored by pynvml.
 *
 * Configuration: FAKE_NVML_CONFIG names a text file, read at every nvmlInit* (the
 * trailing comments below are for the reader; in a file `#` starts whole-line comments):
 *
 *     # global keys (before any section)
 *     driver_version=550.54.15
 *     cuda_driver_version=12040
 *     fail=init:9                  # FIELD:CODE,... ; makes that call return CODE
 *     init_delay_ms=500            # nvmlInit sleeps first (a GPU waking up, no persistence)
 *     not_supported=cuda_driver_version   # same as fail=FIELD:3
 *     [gpu]                        # one section per GPU, in NVML index order
 *     uuid=GPU-...
 *     name=NVIDIA H100 80GB HBM3
 *     memory=85520809984
 *     pci_bus_id=00000000:3B:00.0
 *     minor=3
 *     numa_node=1
 *     cpu_affinity=0-23,48-71      # cpulist; the fake builds NVML's bitmask words
 *     cc=9.0
 *     mig_mode=1
 *     max_mig=7                    # default: highest [mig] slot + 1
 *     fail=handle:4                # fields: handle name uuid memory pci minor numa_node
 *     not_supported=numa_node      #   cpu_affinity cc mig_mode max_mig mig_handle
 *                                  #   processes (both running-process lists)
 *     processes=4242,4243:1048576  # running compute processes: PID[:USED_BYTES][@GI.CI],...
 *     graphics_processes=4244      # running graphics processes, the same way
 *     [mig]                        # a MIG device of the GPU above
 *     slot=0                       # index for nvmlDeviceGetMigDeviceHandleByIndex
 *     uuid=MIG-...
 *     name=NVIDIA H100 80GB HBM3 MIG 1g.10gb
 *     memory=10200547328
 *     gi=7
 *     ci=0                         # fail= fields here: handle name uuid memory gi ci
 *
 * Global fields for fail=: init, count, driver_version, cuda_driver_version.
 * A GPU without numa_node= answers NOT_SUPPORTED there, as x86 machines do.
 *
 * FAKE_NVML_CONTROL, when set, names a file re-read at every device call, so a test can
 * break a GPU while a process holds it: each line `gpu<N>=<code>` (N: the GPU's index in
 * the config) makes every call on GPU N and its MIG devices, handle lookups included,
 * return <code> (15: GPU_IS_LOST). A missing or empty file breaks nothing.
 * FAKE_NVML_LOG, when set, names a file that gets one line per entry point called, so
 * a test can check that every nvmlInit is matched by an nvmlShutdown.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

/* nvml.h: nvmlPciInfo_t (the v3 layout; busIdLegacy is what _v1/_v2 filled). */
typedef struct {
    char busIdLegacy[16];
    unsigned int domain;
    unsigned int bus;
    unsigned int device;
    unsigned int pciDeviceId;
    unsigned int pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;

typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;

#define NVML_MEMORY_V2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2u << 24)))

#define MAX_GPUS 64
#define MAX_MIG 16
#define MAX_FAILS 16
#define MAX_PROCS 32
#define STR 128

typedef struct {
    char field[32];
    int code;
} fail_t;

/* nvml.h: nvmlProcessInfo_t (v2 and v3 share this layout). */
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_t;

typedef struct {
    nvmlProcessInfo_t items[MAX_PROCS];
    int n;
} proc_list_t;

typedef struct fake_device {
    int is_mig;
    int parent; /* MIG: its GPU's index; GPU: its own index */
    int slot; /* MIG: index under its parent */
    char uuid[STR], name[STR], pci_bus_id[STR], cpu_affinity[STR];
    unsigned long long memory;
    int minor, numa_node, cc_major, cc_minor, mig_mode, max_mig, gi, ci;
    fail_t fails[MAX_FAILS];
    int nfails;
    struct fake_device *migs[MAX_MIG];
    int nmigs;
    proc_list_t compute, graphics;
} fake_device;

static fake_device gpus[MAX_GPUS];
static fake_device migs[MAX_GPUS * MAX_MIG];
static int ngpus, nmigs_total, refcount;
static char driver_version[STR] = "550.54.15";
static int cuda_driver_version = 12040;
static fail_t global_fails[MAX_FAILS];
static int nglobal_fails;
static int init_delay_ms;

static void trace(const char *name) {
    const char *path = getenv("FAKE_NVML_LOG");
    if (!path || !*path)
        return;
    FILE *f = fopen(path, "a");
    if (f) {
        fprintf(f, "%s\n", name);
        fclose(f);
    }
}

static int fail_code(const fail_t *fails, int n, const char *field) {
    for (int i = 0; i < n; i++)
        if (strcmp(fails[i].field, field) == 0)
            return fails[i].code;
    return NVML_SUCCESS;
}

/* "a:9,b:3" (or, with default_code, "a,b") appended to fails. */
static void add_fails(fail_t *fails, int *n, const char *value, int default_code) {
    char buf[512];
    snprintf(buf, sizeof buf, "%s", value);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        while (isspace((unsigned char)*tok))
            tok++;
        if (!*tok || *n >= MAX_FAILS)
            continue;
        char *colon = strchr(tok, ':');
        int code = default_code;
        if (colon) {
            *colon = '\0';
            code = atoi(colon + 1);
        }
        snprintf(fails[*n].field, sizeof fails[*n].field, "%s", tok);
        fails[*n].code = code;
        (*n)++;
    }
}

static void copy(char *dst, const char *src) { snprintf(dst, STR, "%s", src); }

/* "4242,4243:1048576,4244@7.0": PID[:USED_BYTES][@GI.CI] entries. Without @, gi and
 * ci are 0xFFFFFFFF, NVML's "not on a MIG device"; with it, the process runs on the MIG
 * device of that GPU instance and compute instance (listed on the parent GPU). */
static void set_procs(proc_list_t *list, const char *value) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", value);
    list->n = 0;
    for (char *tok = strtok(buf, ","); tok && list->n < MAX_PROCS; tok = strtok(NULL, ",")) {
        char *end;
        unsigned long pid = strtoul(tok, &end, 10);
        if (end == tok)
            continue;
        nvmlProcessInfo_t *p = &list->items[list->n++];
        p->pid = (unsigned int)pid;
        p->usedGpuMemory = 0;
        p->gpuInstanceId = p->computeInstanceId = 0xFFFFFFFFu;
        if (*end == ':')
            p->usedGpuMemory = strtoull(end + 1, &end, 10);
        if (*end == '@') {
            p->gpuInstanceId = (unsigned int)strtoul(end + 1, &end, 10);
            if (*end == '.')
                p->computeInstanceId = (unsigned int)strtoul(end + 1, &end, 10);
        }
    }
}

static void set_device(fake_device *d, const char *key, const char *value) {
    if (!strcmp(key, "uuid"))
        copy(d->uuid, value);
    else if (!strcmp(key, "name"))
        copy(d->name, value);
    else if (!strcmp(key, "pci_bus_id"))
        copy(d->pci_bus_id, value);
    else if (!strcmp(key, "cpu_affinity"))
        copy(d->cpu_affinity, value);
    else if (!strcmp(key, "memory"))
        d->memory = strtoull(value, NULL, 10);
    else if (!strcmp(key, "minor"))
        d->minor = atoi(value);
    else if (!strcmp(key, "numa_node"))
        d->numa_node = atoi(value);
    else if (!strcmp(key, "cc"))
        sscanf(value, "%d.%d", &d->cc_major, &d->cc_minor);
    else if (!strcmp(key, "mig_mode"))
        d->mig_mode = atoi(value);
    else if (!strcmp(key, "max_mig"))
        d->max_mig = atoi(value);
    else if (!strcmp(key, "slot"))
        d->slot = atoi(value);
    else if (!strcmp(key, "gi"))
        d->gi = atoi(value);
    else if (!strcmp(key, "ci"))
        d->ci = atoi(value);
    else if (!strcmp(key, "processes"))
        set_procs(&d->compute, value);
    else if (!strcmp(key, "graphics_processes"))
        set_procs(&d->graphics, value);
    else if (!strcmp(key, "fail"))
        add_fails(d->fails, &d->nfails, value, NVML_ERROR_UNKNOWN);
    else if (!strcmp(key, "not_supported"))
        add_fails(d->fails, &d->nfails, value, NVML_ERROR_NOT_SUPPORTED);
    else
        fprintf(stderr, "fake_nvml: unknown key %s\n", key);
}

/* Returns 0, or -1 when the configuration cannot be read (nvmlInit then fails). */
static int load_config(void) {
    ngpus = nmigs_total = nglobal_fails = init_delay_ms = 0;
    memset(gpus, 0, sizeof gpus);
    memset(migs, 0, sizeof migs);
    const char *path = getenv("FAKE_NVML_CONFIG");
    if (!path || !*path) {
        fprintf(stderr, "fake_nvml: FAKE_NVML_CONFIG is not set\n");
        return -1;
    }
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "fake_nvml: cannot open %s\n", path);
        return -1;
    }
    char line[1024];
    fake_device *cur = NULL;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = '\0';
        char *s = line;
        while (isspace((unsigned char)*s))
            s++;
        if (!*s || *s == '#')
            continue;
        if (!strcmp(s, "[gpu]")) {
            if (ngpus == MAX_GPUS)
                break;
            cur = &gpus[ngpus++];
            cur->parent = ngpus - 1;
            cur->numa_node = -1;
            cur->max_mig = -1;
            continue;
        }
        if (!strcmp(s, "[mig]")) {
            if (ngpus == 0 || gpus[ngpus - 1].nmigs == MAX_MIG)
                continue;
            fake_device *parent = &gpus[ngpus - 1];
            cur = &migs[nmigs_total++];
            cur->is_mig = 1;
            cur->parent = ngpus - 1;
            cur->slot = parent->nmigs;
            parent->migs[parent->nmigs++] = cur;
            continue;
        }
        char *eq = strchr(s, '=');
        if (!eq)
            continue;
        *eq = '\0';
        const char *key = s, *value = eq + 1;
        if (cur) {
            set_device(cur, key, value);
        } else if (!strcmp(key, "driver_version")) {
            copy(driver_version, value);
        } else if (!strcmp(key, "init_delay_ms")) {
            init_delay_ms = atoi(value);
        } else if (!strcmp(key, "cuda_driver_version")) {
            cuda_driver_version = atoi(value);
        } else if (!strcmp(key, "fail")) {
            add_fails(global_fails, &nglobal_fails, value, NVML_ERROR_UNKNOWN);
        } else if (!strcmp(key, "not_supported")) {
            add_fails(global_fails, &nglobal_fails, value, NVML_ERROR_NOT_SUPPORTED);
        } else {
            fprintf(stderr, "fake_nvml: unknown global key %s\n", key);
        }
    }
    fclose(f);
    return 0;
}

/* The code FAKE_NVML_CONTROL sets for GPU `index` now, or NVML_SUCCESS. */
static int control_code(int index) {
    const char *path = getenv("FAKE_NVML_CONTROL");
    if (!path || !*path)
        return NVML_SUCCESS;
    FILE *f = fopen(path, "r");
    if (!f)
        return NVML_SUCCESS;
    char line[128];
    int code = NVML_SUCCESS, n = -1, c = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "gpu%d=%d", &n, &c) == 2 && n == index)
            code = c;
    fclose(f);
    return code;
}

/* A handle is valid only if it points into our tables: like NVML, reject anything else. */
static int valid(const fake_device *d) {
    if (d >= gpus && d < gpus + ngpus)
        return 1;
    return d >= migs && d < migs + nmigs_total;
}

#define CHECK_GLOBAL(field)                                                            \
    do {                                                                               \
        trace(__func__);                                                               \
        if (refcount == 0)                                                             \
            return NVML_ERROR_UNINITIALIZED;                                           \
        int code_ = fail_code(global_fails, nglobal_fails, field);                     \
        if (code_)                                                                     \
            return code_;                                                              \
    } while (0)

/* Every device call starts here: log the call, then fail the way the config asks. */
#define CHECK_DEVICE_AS(name, dev, field)                                              \
    do {                                                                               \
        trace(name);                                                                   \
        if (refcount == 0)                                                             \
            return NVML_ERROR_UNINITIALIZED;                                           \
        if (!valid(dev))                                                               \
            return NVML_ERROR_INVALID_ARGUMENT;                                        \
        int code_ = control_code((dev)->parent);                                       \
        if (code_)                                                                     \
            return code_;                                                              \
        code_ = fail_code((dev)->fails, (dev)->nfails, field);                         \
        if (code_)                                                                     \
            return code_;                                                              \
    } while (0)
#define CHECK_DEVICE(dev, field) CHECK_DEVICE_AS(__func__, dev, field)

/* The plain `unsigned int *` getters; mig_only ones refuse a full GPU's handle. */
#define UINT_GETTER(fn, field, value, mig_only)                                        \
    nvmlReturn_t fn(fake_device *d, unsigned int *out) {                               \
        CHECK_DEVICE(d, field);                                                        \
        if ((mig_only) && !d->is_mig)                                                  \
            return NVML_ERROR_INVALID_ARGUMENT;                                        \
        *out = (unsigned int)(value);                                                  \
        return NVML_SUCCESS;                                                           \
    }

static nvmlReturn_t put_string(char *buf, unsigned int length, const char *value) {
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(buf, value);
    return NVML_SUCCESS;
}

/* --- init and shutdown ------------------------------------------------------------ */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    trace("nvmlInit");
    if (load_config() != 0)
        return NVML_ERROR_UNKNOWN;
    if (init_delay_ms > 0)
        usleep((useconds_t)init_delay_ms * 1000);
    int code = fail_code(global_fails, nglobal_fails, "init");
    if (code)
        return code;
    refcount++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    trace("nvmlShutdown");
    if (refcount == 0)
        return NVML_ERROR_UNINITIALIZED;
    refcount--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case 4: return "Insufficient Permissions";
    case 9: return "Driver Not Loaded";
    case 15: return "GPU is lost";
    case 18: return "RM has detected an NVML/RM version mismatch.";
    default: return "Unknown Error";
    }
}

/* --- system ----------------------------------------------------------------------- */

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    CHECK_GLOBAL("driver_version");
    return put_string(version, length, driver_version);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) {
    CHECK_GLOBAL("cuda_driver_version");
    *v = cuda_driver_version;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) {
    CHECK_GLOBAL("cuda_driver_version");
    *v = cuda_driver_version;
    return NVML_SUCCESS;
}

/* --- enumeration ------------------------------------------------------------------ */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    CHECK_GLOBAL("count");
    *count = (unsigned int)ngpus;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, fake_device **device) {
    trace("nvmlDeviceGetHandleByIndex_v2");
    if (refcount == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (index >= (unsigned int)ngpus || !device)
        return NVML_ERROR_INVALID_ARGUMENT;
    int code = control_code((int)index);
    if (!code)
        code = fail_code(gpus[index].fails, gpus[index].nfails, "handle");
    if (code)
        return code;
    *device = &gpus[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, fake_device **device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

/* A GPU or MIG device by its full UUID (what the health poller asks for). */
nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, fake_device **device) {
    trace("nvmlDeviceGetHandleByUUID");
    if (refcount == 0)
        return NVML_ERROR_UNINITIALIZED;
    if (!uuid || !device)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < ngpus + nmigs_total; i++) {
        fake_device *d = i < ngpus ? &gpus[i] : &migs[i - ngpus];
        if (strcmp(d->uuid, uuid) == 0) {
            int code = control_code(d->parent);
            if (!code)
                code = fail_code(d->fails, d->nfails, "handle");
            if (code)
                return code;
            *device = d;
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

/* --- per device ------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetName(fake_device *d, char *name, unsigned int length) {
    CHECK_DEVICE(d, "name");
    return put_string(name, length, d->name);
}

nvmlReturn_t nvmlDeviceGetUUID(fake_device *d, char *uuid, unsigned int length) {
    CHECK_DEVICE(d, "uuid");
    return put_string(uuid, length, d->uuid);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(fake_device *d, nvmlMemory_t *m) {
    CHECK_DEVICE(d, "memory");
    m->total = d->memory;
    m->used = d->memory / 100;
    m->free = m->total - m->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(fake_device *d, nvmlMemory_v2_t *m) {
    CHECK_DEVICE(d, "memory");
    if (m->version != NVML_MEMORY_V2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    m->total = d->memory;
    m->reserved = d->memory / 50;
    m->used = d->memory / 100;
    m->free = m->total - m->reserved - m->used;
    return NVML_SUCCESS;
}

static nvmlReturn_t fill_pci(const char *name, fake_device *d, nvmlPciInfo_t *p,
                             int legacy_only) {
    CHECK_DEVICE_AS(name, d, "pci");
    if (d->is_mig)
        return NVML_ERROR_NOT_SUPPORTED;
    memset(p, 0, sizeof *p);
    unsigned int fn = 0;
    sscanf(d->pci_bus_id, "%x:%x:%x.%x", &p->domain, &p->bus, &p->device, &fn);
    p->pciDeviceId = 0x233010de;
    p->pciSubSystemId = 0x16c110de;
    /* The legacy field holds the short form "0000:3B:00.0". */
    snprintf(p->busIdLegacy, sizeof p->busIdLegacy, "%04X:%02X:%02X.%X", p->domain & 0xffff,
             p->bus, p->device, fn);
    if (!legacy_only)
        snprintf(p->busId, sizeof p->busId, "%.31s", d->pci_bus_id);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v3(fake_device *d, nvmlPciInfo_t *p) {
    return fill_pci(__func__, d, p, 0);
}

nvmlReturn_t nvmlDeviceGetPciInfo_v2(fake_device *d, nvmlPciInfo_t *p) {
    return fill_pci(__func__, d, p, 1);
}

UINT_GETTER(nvmlDeviceGetMinorNumber, "minor", d->minor, 0)

nvmlReturn_t nvmlDeviceGetNumaNodeId(fake_device *d, unsigned int *node) {
    CHECK_DEVICE(d, "numa_node");
    if (d->numa_node < 0)
        return NVML_ERROR_NOT_SUPPORTED;
    *node = (unsigned int)d->numa_node;
    return NVML_SUCCESS;
}

/* cpuSet: cpuSetSize unsigned longs, CPU n is bit n%64 of word n/64 (64-bit Linux). */
nvmlReturn_t nvmlDeviceGetCpuAffinity(fake_device *d, unsigned int cpuSetSize,
                                      unsigned long *cpuSet) {
    CHECK_DEVICE(d, "cpu_affinity");
    if (!cpuSet || cpuSetSize == 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    memset(cpuSet, 0, cpuSetSize * sizeof *cpuSet);
    char buf[STR];
    snprintf(buf, sizeof buf, "%s", d->cpu_affinity);
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        unsigned int lo = 0, hi = 0;
        int n = sscanf(tok, "%u-%u", &lo, &hi);
        if (n < 1)
            continue;
        if (n == 1)
            hi = lo;
        for (unsigned int cpu = lo; cpu <= hi; cpu++)
            if (cpu / 64 < cpuSetSize)
                cpuSet[cpu / 64] |= 1UL << (cpu % 64);
    }
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(fake_device *d, int *major, int *minor) {
    CHECK_DEVICE(d, "cc");
    *major = d->cc_major;
    *minor = d->cc_minor;
    return NVML_SUCCESS;
}

/* --- MIG -------------------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetMigMode(fake_device *d, unsigned int *current, unsigned int *pending) {
    CHECK_DEVICE(d, "mig_mode");
    *current = *pending = (unsigned int)d->mig_mode;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(fake_device *d, unsigned int *count) {
    CHECK_DEVICE(d, "max_mig");
    int n = d->max_mig;
    if (n < 0) {
        n = 0;
        for (int i = 0; i < d->nmigs; i++)
            if (d->migs[i]->slot + 1 > n)
                n = d->migs[i]->slot + 1;
    }
    *count = (unsigned int)n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(fake_device *d, unsigned int index,
                                                 fake_device **mig) {
    CHECK_DEVICE(d, "mig_handle");
    if (!d->mig_mode)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (int i = 0; i < d->nmigs; i++) {
        if ((unsigned int)d->migs[i]->slot == index) {
            int code = fail_code(d->migs[i]->fails, d->migs[i]->nfails, "handle");
            if (code)
                return code;
            *mig = d->migs[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

UINT_GETTER(nvmlDeviceIsMigDeviceHandle, "is_mig", d->is_mig, 0)

UINT_GETTER(nvmlDeviceGetGpuInstanceId, "gi", d->gi, 1)

UINT_GETTER(nvmlDeviceGetComputeInstanceId, "ci", d->ci, 1)

/* --- running processes -------------------------------------------------------------- */

/* NVML's two-call protocol: too small a buffer (or none) gets the count and
 * INSUFFICIENT_SIZE; no process at all is SUCCESS with a count of 0. */
static nvmlReturn_t get_procs(const char *name, fake_device *d, const proc_list_t *list,
                              unsigned int *count, nvmlProcessInfo_t *infos) {
    CHECK_DEVICE_AS(name, d, "processes");
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    unsigned int n = (unsigned int)list->n;
    if (n == 0) {
        *count = 0;
        return NVML_SUCCESS;
    }
    if (!infos || *count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(infos, list->items, n * sizeof *infos);
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(fake_device *d, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    return get_procs(__func__, d, &d->compute, count, infos);
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(fake_device *d, unsigned int *count,
                                                     nvmlProcessInfo_t *infos) {
    return get_procs(__func__, d, &d->compute, count, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(fake_device *d, unsigned int *count,
                                                      nvmlProcessInfo_t *infos) {
    return get_procs(__func__, d, &d->graphics, count, infos);
}

nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(fake_device *d, unsigned int *count,
                                                      nvmlProcessInfo_t *infos) {
    return get_procs(__func__, d, &d->graphics, count, infos);
}
