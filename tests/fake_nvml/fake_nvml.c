/*
 * A stand-in for the NVIDIA driver's libnvidia-ml.so.1, for tests on machines without a GPU.
 *
 * It is compiled against the real nvml.h (from the nvidia-nvml-dev wheel), so every signature is the driver's, and
 * pynvml loads it by its usual name through the dynamic loader. The machine it describes is read, at the first
 * nvmlInit after the last nvmlShutdown, from the JSON text in the environment variable FAKE_NVML_MACHINE:
 *
 *   {"driver_version": "550.54.15", "cuda_driver_version": 12040,
 *    "init_error": 0,            (optional: nvmlInit fails with this NVML return code, e.g. 9 = driver not loaded)
 *    "init_delay_ms": 0,         (optional: nvmlInit takes this long, as a real driver may)
 *    "devices": [
 *      {"name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-...", "memory_mib": 81920, "used_mib": 0,
 *       "ecc_uncorrected": 0,    (volatile uncorrected ECC errors; null or absent: ECC not supported)
 *       "lost": false,           (true: every call on the card fails with NVML_ERROR_GPU_IS_LOST)
 *       "mig": {"enabled": true, "max_devices": 7,      (absent: the card cannot do MIG)
 *               "devices": [{"name": "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "uuid": "MIG-...", "memory_mib": 9984}]}}
 *    ]}
 *
 * Unset FAKE_NVML_MACHINE means no driver: nvmlInit returns NVML_ERROR_DRIVER_NOT_LOADED. A description that cannot
 * be read makes nvmlInit print why on stderr and return NVML_ERROR_UNKNOWN.
 */
#include <ctype.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nvml.h"

#define MAX_CARDS 64
#define MAX_MIG 16
#define TEXT 96

struct nvmlDevice_st {
    int is_mig;
    unsigned int index; /* NVML index of a card; position of a MIG device on its card */
    struct nvmlDevice_st *parent;
    char name[TEXT];
    char uuid[TEXT];
    unsigned long long memory;
    unsigned long long used;
    long long ecc_uncorrected; /* -1: not supported */
    int lost;
    int mig_capable;
    int mig_enabled;
    unsigned int mig_max;
    unsigned int mig_count;
    struct nvmlDevice_st *mig[MAX_MIG];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int refcount;
static struct nvmlDevice_st cards[MAX_CARDS];
static struct nvmlDevice_st migs[MAX_CARDS][MAX_MIG];
static unsigned int card_count;
static char driver_version[TEXT];
static int cuda_driver_version;

/* ---- a small JSON reader: enough for the description above ------------------------------------------------- */

enum kind { J_NULL, J_BOOL, J_NUMBER, J_STRING, J_ARRAY, J_OBJECT };

struct json {
    enum kind kind;
    double number;
    char *string;
    int count;
    char **keys;
    struct json *items;
};

struct reader {
    const char *at;
    const char *error;
};

static void skip_space(struct reader *r) {
    while (*r->at && isspace((unsigned char)*r->at)) r->at++;
}

static int parse_value(struct reader *r, struct json *out);

static char *parse_string(struct reader *r) {
    if (*r->at != '"') {
        r->error = "expected a string";
        return NULL;
    }
    r->at++;
    size_t cap = 16, len = 0;
    char *s = malloc(cap);
    while (*r->at && *r->at != '"') {
        char c = *r->at++;
        if (c == '\\') {
            c = *r->at++;
            switch (c) {
                case 'n': c = '\n'; break;
                case 't': c = '\t'; break;
                case '"': case '\\': case '/': break;
                default: r->error = "unsupported escape in a string"; free(s); return NULL;
            }
        }
        if (len + 2 > cap) s = realloc(s, cap *= 2);
        s[len++] = c;
    }
    if (*r->at != '"') {
        r->error = "unterminated string";
        free(s);
        return NULL;
    }
    r->at++;
    s[len] = 0;
    return s;
}

static int parse_container(struct reader *r, struct json *out, int object) {
    char close = object ? '}' : ']';
    out->kind = object ? J_OBJECT : J_ARRAY;
    r->at++;
    skip_space(r);
    if (*r->at == close) {
        r->at++;
        return 0;
    }
    for (;;) {
        out->items = realloc(out->items, sizeof(struct json) * (out->count + 1));
        out->keys = realloc(out->keys, sizeof(char *) * (out->count + 1));
        out->keys[out->count] = NULL;
        memset(&out->items[out->count], 0, sizeof(struct json));
        skip_space(r);
        if (object) {
            out->keys[out->count] = parse_string(r);
            if (!out->keys[out->count]) return -1;
            skip_space(r);
            if (*r->at++ != ':') {
                r->error = "expected ':'";
                return -1;
            }
        }
        if (parse_value(r, &out->items[out->count]) < 0) return -1;
        out->count++;
        skip_space(r);
        if (*r->at == ',') {
            r->at++;
            continue;
        }
        if (*r->at == close) {
            r->at++;
            return 0;
        }
        r->error = object ? "expected ',' or '}'" : "expected ',' or ']'";
        return -1;
    }
}

static int parse_value(struct reader *r, struct json *out) {
    skip_space(r);
    char c = *r->at;
    if (c == '{' || c == '[') return parse_container(r, out, c == '{');
    if (c == '"') {
        out->kind = J_STRING;
        out->string = parse_string(r);
        return out->string ? 0 : -1;
    }
    if (!strncmp(r->at, "true", 4) || !strncmp(r->at, "false", 5)) {
        out->kind = J_BOOL;
        out->number = c == 't';
        r->at += c == 't' ? 4 : 5;
        return 0;
    }
    if (!strncmp(r->at, "null", 4)) {
        out->kind = J_NULL;
        r->at += 4;
        return 0;
    }
    char *end;
    out->number = strtod(r->at, &end);
    if (end == r->at) {
        r->error = "unexpected character";
        return -1;
    }
    out->kind = J_NUMBER;
    r->at = end;
    return 0;
}

static void free_json(struct json *j) {
    for (int i = 0; i < j->count; i++) {
        free_json(&j->items[i]);
        free(j->keys[i]);
    }
    free(j->items);
    free(j->keys);
    free(j->string);
}

static const struct json *get(const struct json *object, const char *key) {
    if (!object || object->kind != J_OBJECT) return NULL;
    for (int i = 0; i < object->count; i++)
        if (!strcmp(object->keys[i], key)) return &object->items[i];
    return NULL;
}

static double number(const struct json *object, const char *key, double otherwise) {
    const struct json *v = get(object, key);
    return v && (v->kind == J_NUMBER || v->kind == J_BOOL) ? v->number : otherwise;
}

static const char *string(const struct json *object, const char *key, const char *otherwise) {
    const struct json *v = get(object, key);
    return v && v->kind == J_STRING ? v->string : otherwise;
}

/* ---- the machine ---------------------------------------------------------------------------------------------- */

static void describe(struct nvmlDevice_st *d, const struct json *j, int is_mig, unsigned int index) {
    memset(d, 0, sizeof(*d));
    d->is_mig = is_mig;
    d->index = index;
    snprintf(d->name, TEXT, "%s", string(j, "name", "NVIDIA Fake GPU"));
    snprintf(d->uuid, TEXT, "%s", string(j, "uuid", is_mig ? "MIG-00000000-0000-0000-0000-000000000000"
                                                            : "GPU-00000000-0000-0000-0000-000000000000"));
    d->memory = (unsigned long long)number(j, "memory_mib", 16384) << 20;
    d->used = (unsigned long long)number(j, "used_mib", 0) << 20;
    const struct json *ecc = get(j, "ecc_uncorrected");
    d->ecc_uncorrected = ecc && ecc->kind == J_NUMBER ? (long long)ecc->number : -1;
    d->lost = number(j, "lost", 0) != 0;
}

static nvmlReturn_t load_machine(void) {
    const char *text = getenv("FAKE_NVML_MACHINE");
    if (!text) return NVML_ERROR_DRIVER_NOT_LOADED;
    struct reader r = {text, NULL};
    struct json root = {0};
    if (parse_value(&r, &root) < 0 || root.kind != J_OBJECT) {
        fprintf(stderr, "fake nvml: FAKE_NVML_MACHINE: %s at offset %ld\n", r.error ? r.error : "expected an object",
                (long)(r.at - text));
        free_json(&root);
        return NVML_ERROR_UNKNOWN;
    }
    nvmlReturn_t init_error = (nvmlReturn_t)number(&root, "init_error", 0);
    long delay_ms = (long)number(&root, "init_delay_ms", 0);
    if (delay_ms > 0) {
        struct timespec t = {delay_ms / 1000, (delay_ms % 1000) * 1000000L};
        nanosleep(&t, NULL);
    }
    snprintf(driver_version, TEXT, "%s", string(&root, "driver_version", "550.54.15"));
    cuda_driver_version = (int)number(&root, "cuda_driver_version", 12040);
    const struct json *devices = get(&root, "devices");
    card_count = 0;
    for (int i = 0; devices && devices->kind == J_ARRAY && i < devices->count && i < MAX_CARDS; i++) {
        const struct json *dj = &devices->items[i];
        struct nvmlDevice_st *card = &cards[card_count];
        describe(card, dj, 0, card_count);
        const struct json *mig = get(dj, "mig");
        if (mig && mig->kind == J_OBJECT) {
            card->mig_capable = 1;
            card->mig_enabled = number(mig, "enabled", 0) != 0;
            card->mig_max = (unsigned int)number(mig, "max_devices", 7);
            const struct json *md = get(mig, "devices");
            for (int k = 0; card->mig_enabled && md && md->kind == J_ARRAY && k < md->count && k < MAX_MIG; k++) {
                struct nvmlDevice_st *m = &migs[card_count][k];
                describe(m, &md->items[k], 1, (unsigned int)k);
                m->parent = card;
                m->ecc_uncorrected = -1;
                card->mig[card->mig_count++] = m;
            }
        }
        card_count++;
    }
    free_json(&root);
    return init_error;
}

static nvmlReturn_t check(nvmlDevice_t d) {
    if (refcount == 0) return NVML_ERROR_UNINITIALIZED;
    if (!d) return NVML_ERROR_INVALID_ARGUMENT;
    if (d->lost || (d->parent && d->parent->lost)) return NVML_ERROR_GPU_IS_LOST;
    return NVML_SUCCESS;
}

static nvmlReturn_t copy_text(char *out, unsigned int length, const char *text) {
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(text) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, text);
    return NVML_SUCCESS;
}

/* ---- the NVML entry points pynvml resolves by name ------------------------------------------------------------ */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&lock);
    nvmlReturn_t ret = NVML_SUCCESS;
    if (refcount == 0) ret = load_machine();
    if (ret == NVML_SUCCESS) refcount++;
    pthread_mutex_unlock(&lock);
    return ret;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    nvmlReturn_t ret = refcount > 0 ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    if (refcount > 0) refcount--;
    pthread_mutex_unlock(&lock);
    return ret;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
        case NVML_SUCCESS: return "Success";
        case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
        case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
        case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
        case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
        case NVML_ERROR_NOT_FOUND: return "Not Found";
        case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
        case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
        case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
        default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    if (refcount == 0) return NVML_ERROR_UNINITIALIZED;
    return copy_text(version, length, driver_version);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    *version = cuda_driver_version;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    if (refcount == 0) return NVML_ERROR_UNINITIALIZED;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = card_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    if (refcount == 0) return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= card_count) return NVML_ERROR_INVALID_ARGUMENT;
    if (cards[index].lost) return NVML_ERROR_GPU_IS_LOST;
    *device = &cards[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    if (refcount == 0) return NVML_ERROR_UNINITIALIZED;
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned int i = 0; i < card_count; i++) {
        if (!strcmp(cards[i].uuid, uuid)) {
            *device = &cards[i];
            return cards[i].lost ? NVML_ERROR_GPU_IS_LOST : NVML_SUCCESS;
        }
        for (unsigned int k = 0; k < cards[i].mig_count; k++)
            if (!strcmp(cards[i].mig[k]->uuid, uuid)) {
                *device = cards[i].mig[k];
                return NVML_SUCCESS;
            }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    nvmlReturn_t ret = check(device);
    return ret != NVML_SUCCESS ? ret : copy_text(name, length, device->name);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    nvmlReturn_t ret = check(device);
    return ret != NVML_SUCCESS ? ret : copy_text(uuid, length, device->uuid);
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS) return ret;
    if (!index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = device->is_mig ? device->parent->index : device->index;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS) return ret;
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    memory->total = device->memory;
    memory->used = device->used;
    memory->free = device->memory - device->used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, nvmlMemoryErrorType_t errorType,
                                         nvmlEccCounterType_t counterType, unsigned long long *eccCounts) {
    (void)counterType;
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS) return ret;
    if (!eccCounts) return NVML_ERROR_INVALID_ARGUMENT;
    if (device->is_mig || device->ecc_uncorrected < 0) return NVML_ERROR_NOT_SUPPORTED;
    *eccCounts = errorType == NVML_MEMORY_ERROR_TYPE_UNCORRECTED ? (unsigned long long)device->ecc_uncorrected : 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *currentMode, unsigned int *pendingMode) {
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS) return ret;
    if (!currentMode || !pendingMode) return NVML_ERROR_INVALID_ARGUMENT;
    if (device->is_mig || !device->mig_capable) return NVML_ERROR_NOT_SUPPORTED;
    *currentMode = *pendingMode = device->mig_enabled ? NVML_DEVICE_MIG_ENABLE : NVML_DEVICE_MIG_DISABLE;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS) return ret;
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    if (device->is_mig || !device->mig_capable) return NVML_ERROR_NOT_SUPPORTED;
    *count = device->mig_max;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *migDevice) {
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS) return ret;
    if (!migDevice || device->is_mig || !device->mig_capable || index >= device->mig_max)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!device->mig_enabled || index >= device->mig_count) return NVML_ERROR_NOT_FOUND;
    *migDevice = device->mig[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *isMigDevice) {
    nvmlReturn_t ret = check(device);
    if (ret != NVML_SUCCESS) return ret;
    if (!isMigDevice) return NVML_ERROR_INVALID_ARGUMENT;
    *isMigDevice = (unsigned int)device->is_mig;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t migDevice, nvmlDevice_t *device) {
    nvmlReturn_t ret = check(migDevice);
    if (ret != NVML_SUCCESS) return ret;
    if (!device || !migDevice->is_mig) return NVML_ERROR_INVALID_ARGUMENT;
    *device = migDevice->parent;
    return NVML_SUCCESS;
}
