/*
 * pipeline_stats: per-pipeline statistics (registers, spills, shared memory, ...) as the Vulkan
 * driver reports them through VK_KHR_pipeline_executable_properties, which kp does not expose.
 *
 * Build (C99, Vulkan headers >= 1.3 from libvulkan-dev, libc):
 *
 *     cc -O2 -o /tmp/pipeline_stats scripts/pipeline_stats.c -lvulkan
 *
 * Usage: one pipeline per line on stdin,
 *
 *     NAME PATH_TO_SPV C0 C1 ... C8
 *
 * (no spaces in NAME or PATH; C0.. are the uint32 specialization constants with constant_id 0, 1,
 * ... -- KernelConfig.spec() in aule_kp/vulkan/configs.py gives 9; up to 32 are taken; blank lines
 * and lines starting with '#' are skipped). For each it creates the compute pipeline as kp does
 * (entry point "main", one descriptor set of 9 storage buffers at bindings 0..8, a 128-byte push
 * constant range) plus VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR, and prints one line:
 *
 *     NAME key=value key=value ...
 *
 * with every statistic of every executable of the pipeline (statistic names with spaces turned
 * into underscores; with more than one executable, keys are prefixed "e<index>."), plus the
 * executable's subgroupSize. With PIPELINE_IR_DIR set, the pipelines also capture their internal
 * representations (whatever IR / ISA text the driver gives), written to
 * PIPELINE_IR_DIR/NAME.e<executable>.<index>.txt, and each line gets "representations=<count>".
 * A pipeline that cannot be made prints "NAME error=<VkResult number>"
 * (with a reason=... where the tool knows one) and the tool goes on with the next line.
 * The first output line is a comment, "# device=... api=... driver=... coopmat=0|1".
 *
 * The device is the one at index AULE_KP_DEVICE (default 0) in vkEnumeratePhysicalDevices order,
 * as in aule_kp. It is created like kp's (patches/kp-0.9.0-aule.patch) does it: every Vulkan
 * 1.1/1.2/1.3 core feature the device reports, VK_KHR_cooperative_matrix (with its feature) when
 * present, robustBufferAccess and cooperativeMatrixRobustBufferAccess off; plus
 * VK_KHR_pipeline_executable_properties with pipelineExecutableInfo.
 *
 * Exit status: 0 after all lines (whatever each pipeline gave), 2 when the device lacks
 * VK_KHR_pipeline_executable_properties (one line on stderr says so), 1 on any other set-up
 * failure. AULE_KP_STATS_WITHOUT_EXT=1 goes on without the extension (pipelines are created and
 * report "created=1" and no statistics): a smoke test for drivers such as lavapipe.
 */

#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vulkan/vulkan.h>

/* Debian 12's headers (1.3.239) predate VK_KHR_cooperative_matrix. */
#define STATS_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_KHR 1000506000
typedef struct StatsCooperativeMatrixFeaturesKHR {
    VkStructureType sType;
    void *pNext;
    VkBool32 cooperativeMatrix;
    VkBool32 cooperativeMatrixRobustBufferAccess;
} StatsCooperativeMatrixFeaturesKHR;

#define COOPMAT_EXT "VK_KHR_cooperative_matrix"
#define SPIRV_OP_CAPABILITY 17u
#define SPIRV_CAPABILITY_COOPERATIVE_MATRIX_KHR 6022u
#define SPIRV_MAGIC 0x07230203u

#define N_BINDINGS 9u
#define PUSH_BYTES 128u
#define MAX_CONSTANTS 32u
#define LINE_MAX_CHARS 8192

typedef struct Ctx {
    VkInstance instance;
    VkPhysicalDevice physical;
    VkDevice device;
    int have_stats;     /* extension and feature enabled */
    int have_coopmat;   /* VK_KHR_cooperative_matrix and its feature enabled */
    PFN_vkGetPipelineExecutablePropertiesKHR get_executables;
    PFN_vkGetPipelineExecutableStatisticsKHR get_statistics;
    PFN_vkGetPipelineExecutableInternalRepresentationsKHR get_representations;
    const char *ir_dir; /* PIPELINE_IR_DIR: where the driver's internal representations go (NULL: none) */
} Ctx;

static void cleanup(Ctx *c)
{
    if (c->device != VK_NULL_HANDLE) {
        vkDestroyDevice(c->device, NULL);
        c->device = VK_NULL_HANDLE;
    }
    if (c->instance != VK_NULL_HANDLE) {
        vkDestroyInstance(c->instance, NULL);
        c->instance = VK_NULL_HANDLE;
    }
}

static int fail(Ctx *c, const char *what, VkResult r)
{
    fprintf(stderr, "pipeline_stats: %s failed: VkResult %d\n", what, (int)r);
    cleanup(c);
    return 1;
}

static int has_extension(const VkExtensionProperties *exts, uint32_t n, const char *name)
{
    uint32_t i;
    for (i = 0; i < n; ++i) {
        if (strcmp(exts[i].extensionName, name) == 0) {
            return 1;
        }
    }
    return 0;
}

/* Links f2 -> chain[0] -> ... -> chain[n - 1] (each a Vulkan struct with sType and pNext first). */
static void link_chain(VkPhysicalDeviceFeatures2 *f2, void **chain, uint32_t n)
{
    uint32_t i;
    f2->pNext = n ? chain[0] : NULL;
    for (i = 0; i < n; ++i) {
        ((VkBaseOutStructure *)chain[i])->pNext = i + 1 < n ? (VkBaseOutStructure *)chain[i + 1] : NULL;
    }
}

/* Sets up instance, physical device and device. Returns 0, or the exit status. */
static int setup(Ctx *c)
{
    VkApplicationInfo app;
    VkInstanceCreateInfo ici;
    VkResult r;
    uint32_t n_phys = 0, index = 0, n_ext = 0, n_qf = 0, qf, i;
    VkPhysicalDevice *phys;
    VkPhysicalDeviceProperties props;
    VkExtensionProperties *exts;
    VkQueueFamilyProperties *qfs;
    const char *env = getenv("AULE_KP_DEVICE");
    const char *without = getenv("AULE_KP_STATS_WITHOUT_EXT");
    int has_exec_ext, has_coop_ext, minor;
    VkPhysicalDeviceFeatures2 f2;
    VkPhysicalDeviceVulkan11Features f11;
    VkPhysicalDeviceVulkan12Features f12;
    VkPhysicalDeviceVulkan13Features f13;
    VkPhysicalDevicePipelineExecutablePropertiesFeaturesKHR fexec;
    StatsCooperativeMatrixFeaturesKHR fcoop;
    void *chain[6];
    uint32_t n_chain = 0;
    const char *enabled[2];
    uint32_t n_enabled = 0;
    float priority = 1.0f;
    VkDeviceQueueCreateInfo qci;
    VkDeviceCreateInfo dci;

    if (env != NULL && *env != '\0') {
        char *end = NULL;
        unsigned long v;
        errno = 0;
        v = strtoul(env, &end, 10);
        if (errno != 0 || end == env || *end != '\0' || v > 0xFFFFFFFFul) {
            fprintf(stderr, "pipeline_stats: AULE_KP_DEVICE must be a device index, got '%s'\n", env);
            return 1;
        }
        index = (uint32_t)v;
    }

    memset(&app, 0, sizeof app);
    app.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO;
    app.pApplicationName = "aule-kp pipeline_stats";
    app.apiVersion = VK_API_VERSION_1_3;
    memset(&ici, 0, sizeof ici);
    ici.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO;
    ici.pApplicationInfo = &app;
    r = vkCreateInstance(&ici, NULL, &c->instance);
    if (r != VK_SUCCESS) {
        c->instance = VK_NULL_HANDLE;
        return fail(c, "vkCreateInstance", r);
    }

    r = vkEnumeratePhysicalDevices(c->instance, &n_phys, NULL);
    if (r != VK_SUCCESS) {
        return fail(c, "vkEnumeratePhysicalDevices", r);
    }
    if (index >= n_phys) {
        fprintf(stderr, "pipeline_stats: AULE_KP_DEVICE=%" PRIu32 " but there are %" PRIu32 " device(s)\n",
                index, n_phys);
        cleanup(c);
        return 1;
    }
    phys = (VkPhysicalDevice *)calloc(n_phys, sizeof *phys);
    if (phys == NULL) {
        return fail(c, "calloc", VK_ERROR_OUT_OF_HOST_MEMORY);
    }
    r = vkEnumeratePhysicalDevices(c->instance, &n_phys, phys);
    if (r != VK_SUCCESS && r != VK_INCOMPLETE) {
        free(phys);
        return fail(c, "vkEnumeratePhysicalDevices", r);
    }
    if (index >= n_phys) {
        free(phys);
        fprintf(stderr, "pipeline_stats: device %" PRIu32 " vanished\n", index);
        cleanup(c);
        return 1;
    }
    c->physical = phys[index];
    free(phys);
    vkGetPhysicalDeviceProperties(c->physical, &props);
    minor = (int)VK_API_VERSION_MINOR(props.apiVersion);
    if (VK_API_VERSION_MAJOR(props.apiVersion) > 1) {
        minor = 99;
    }

    r = vkEnumerateDeviceExtensionProperties(c->physical, NULL, &n_ext, NULL);
    if (r != VK_SUCCESS) {
        return fail(c, "vkEnumerateDeviceExtensionProperties", r);
    }
    exts = (VkExtensionProperties *)calloc(n_ext ? n_ext : 1, sizeof *exts);
    if (exts == NULL) {
        return fail(c, "calloc", VK_ERROR_OUT_OF_HOST_MEMORY);
    }
    r = vkEnumerateDeviceExtensionProperties(c->physical, NULL, &n_ext, exts);
    if (r != VK_SUCCESS && r != VK_INCOMPLETE) {
        free(exts);
        return fail(c, "vkEnumerateDeviceExtensionProperties", r);
    }
    has_exec_ext = has_extension(exts, n_ext, VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME);
    has_coop_ext = has_extension(exts, n_ext, COOPMAT_EXT);
    free(exts);

    /* Features: the same chain for the query and for vkCreateDevice. */
    memset(&f2, 0, sizeof f2);
    memset(&f11, 0, sizeof f11);
    memset(&f12, 0, sizeof f12);
    memset(&f13, 0, sizeof f13);
    memset(&fexec, 0, sizeof fexec);
    memset(&fcoop, 0, sizeof fcoop);
    f2.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2;
    f11.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES;
    f12.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES;
    f13.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_3_FEATURES;
    fexec.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PIPELINE_EXECUTABLE_PROPERTIES_FEATURES_KHR;
    fcoop.sType = (VkStructureType)STATS_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_KHR;
    if (minor >= 2) { /* the VulkanXYFeatures structs exist from 1.2 on */
        chain[n_chain++] = &f11;
        chain[n_chain++] = &f12;
    }
    if (minor >= 3) {
        chain[n_chain++] = &f13;
    }
    if (has_coop_ext) {
        chain[n_chain++] = &fcoop;
    }
    if (has_exec_ext) {
        chain[n_chain++] = &fexec; /* last: dropped again below when the feature is off */
    }
    link_chain(&f2, chain, n_chain);
    vkGetPhysicalDeviceFeatures2(c->physical, &f2);

    if (!has_exec_ext || !fexec.pipelineExecutableInfo) {
        fprintf(stderr, "pipeline_stats: %s (device %" PRIu32 ") does not support %s%s\n", props.deviceName,
                index, VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME,
                has_exec_ext ? " (pipelineExecutableInfo feature off)" : "");
        if (without == NULL || strcmp(without, "1") != 0) {
            cleanup(c);
            return 2;
        }
    } else {
        c->have_stats = 1;
        enabled[n_enabled++] = VK_KHR_PIPELINE_EXECUTABLE_PROPERTIES_EXTENSION_NAME;
    }
    if (has_coop_ext) {
        enabled[n_enabled++] = COOPMAT_EXT;
        c->have_coopmat = fcoop.cooperativeMatrix ? 1 : 0;
    }
    f2.features.robustBufferAccess = VK_FALSE;
    fcoop.cooperativeMatrixRobustBufferAccess = VK_FALSE;
    if (!c->have_stats && has_exec_ext) {
        link_chain(&f2, chain, n_chain - 1); /* without fexec, the last */
    }

    /* A compute queue. */
    vkGetPhysicalDeviceQueueFamilyProperties(c->physical, &n_qf, NULL);
    qfs = (VkQueueFamilyProperties *)calloc(n_qf ? n_qf : 1, sizeof *qfs);
    if (qfs == NULL) {
        return fail(c, "calloc", VK_ERROR_OUT_OF_HOST_MEMORY);
    }
    vkGetPhysicalDeviceQueueFamilyProperties(c->physical, &n_qf, qfs);
    qf = n_qf;
    for (i = 0; i < n_qf; ++i) {
        if ((qfs[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && qfs[i].queueCount > 0) {
            qf = i;
            break;
        }
    }
    free(qfs);
    if (qf == n_qf) {
        fprintf(stderr, "pipeline_stats: %s has no compute queue\n", props.deviceName);
        cleanup(c);
        return 1;
    }

    memset(&qci, 0, sizeof qci);
    qci.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO;
    qci.queueFamilyIndex = qf;
    qci.queueCount = 1;
    qci.pQueuePriorities = &priority;
    memset(&dci, 0, sizeof dci);
    dci.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO;
    dci.pNext = &f2;
    dci.queueCreateInfoCount = 1;
    dci.pQueueCreateInfos = &qci;
    dci.enabledExtensionCount = n_enabled;
    dci.ppEnabledExtensionNames = n_enabled ? enabled : NULL;
    dci.pEnabledFeatures = NULL;
    r = vkCreateDevice(c->physical, &dci, NULL, &c->device);
    if (r != VK_SUCCESS) {
        c->device = VK_NULL_HANDLE;
        return fail(c, "vkCreateDevice", r);
    }

    if (c->have_stats) {
        c->get_executables = (PFN_vkGetPipelineExecutablePropertiesKHR)vkGetDeviceProcAddr(
            c->device, "vkGetPipelineExecutablePropertiesKHR");
        c->get_statistics = (PFN_vkGetPipelineExecutableStatisticsKHR)vkGetDeviceProcAddr(
            c->device, "vkGetPipelineExecutableStatisticsKHR");
        c->get_representations = (PFN_vkGetPipelineExecutableInternalRepresentationsKHR)vkGetDeviceProcAddr(
            c->device, "vkGetPipelineExecutableInternalRepresentationsKHR");
        c->ir_dir = getenv("PIPELINE_IR_DIR");
        if (c->get_executables == NULL || c->get_statistics == NULL) {
            fprintf(stderr, "pipeline_stats: vkGetDeviceProcAddr gave no VK_KHR_pipeline_executable_properties "
                            "entry points\n");
            cleanup(c);
            return 1;
        }
    }

    printf("# device=%s api=%u.%u.%u driver=0x%08" PRIx32 " vendor=0x%04" PRIx32 " coopmat=%d stats=%d\n",
           props.deviceName, VK_API_VERSION_MAJOR(props.apiVersion), VK_API_VERSION_MINOR(props.apiVersion),
           VK_API_VERSION_PATCH(props.apiVersion), props.driverVersion, props.vendorID, c->have_coopmat,
           c->have_stats);
    fflush(stdout);
    return 0;
}

/* Reads a SPIR-V file; returns a malloc'd buffer of *n_words words, or NULL. */
static uint32_t *read_spirv(const char *path, size_t *n_words)
{
    FILE *f = fopen(path, "rb");
    long size;
    uint32_t *words;

    if (f == NULL) {
        return NULL;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 20 || size % 4 != 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return NULL;
    }
    words = (uint32_t *)malloc((size_t)size);
    if (words == NULL) {
        fclose(f);
        return NULL;
    }
    if (fread(words, 1, (size_t)size, f) != (size_t)size || words[0] != SPIRV_MAGIC) {
        free(words);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *n_words = (size_t)size / 4;
    return words;
}

/* Whether the module declares OpCapability CooperativeMatrixKHR. */
static int uses_coopmat(const uint32_t *words, size_t n)
{
    size_t i = 5; /* past the header */
    while (i < n) {
        uint32_t count = words[i] >> 16, op = words[i] & 0xFFFFu;
        if (count == 0 || i + count > n) {
            return 0;
        }
        if (op == SPIRV_OP_CAPABILITY && count >= 2 && words[i + 1] == SPIRV_CAPABILITY_COOPERATIVE_MATRIX_KHR) {
            return 1;
        }
        i += count;
    }
    return 0;
}

/* Prints a statistic name with whitespace and '=' replaced by '_'. */
static void print_key(const char *prefix, const char *name)
{
    const char *p;
    fputs(prefix, stdout);
    for (p = name; *p != '\0'; ++p) {
        char ch = *p;
        putchar(ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '=' ? '_' : ch);
    }
}

/* Writes executable `e`'s internal representations (the driver's IR / ISA text, where it gives any)
 * to PIPELINE_IR_DIR/<name>.e<e>.<i>.txt and prints " <prefix>representations=<count>". */
static void dump_representations(const Ctx *c, const VkPipelineExecutableInfoKHR *einfo, const char *name,
                                 const char *prefix)
{
    VkPipelineExecutableInternalRepresentationKHR *reps;
    uint32_t n = 0, i;
    VkResult r = c->get_representations(c->device, einfo, &n, NULL);

    printf(" %srepresentations=%" PRIu32, prefix, r == VK_SUCCESS ? n : 0);
    if (r != VK_SUCCESS || n == 0) {
        return;
    }
    reps = (VkPipelineExecutableInternalRepresentationKHR *)calloc(n, sizeof *reps);
    if (reps == NULL) {
        return;
    }
    for (i = 0; i < n; ++i) {
        reps[i].sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INTERNAL_REPRESENTATION_KHR;
    }
    r = c->get_representations(c->device, einfo, &n, reps); /* sizes */
    for (i = 0; r == VK_SUCCESS && i < n; ++i) {
        reps[i].pData = malloc(reps[i].dataSize ? reps[i].dataSize : 1);
    }
    if (r == VK_SUCCESS) {
        r = c->get_representations(c->device, einfo, &n, reps);
    }
    for (i = 0; i < n; ++i) {
        char path[4096];
        FILE *f;
        snprintf(path, sizeof path, "%s/%s.e%" PRIu32 ".%" PRIu32 ".txt", c->ir_dir, name, einfo->executableIndex, i);
        if ((r == VK_SUCCESS || r == VK_INCOMPLETE) && reps[i].pData != NULL && (f = fopen(path, "wb")) != NULL) {
            fprintf(f, "# %s: %s (%s)\n", reps[i].name, reps[i].description, reps[i].isText ? "text" : "binary");
            /* Text representations end in a NUL the file does not need. */
            fwrite(reps[i].pData, 1, reps[i].isText && reps[i].dataSize ? reps[i].dataSize - 1 : reps[i].dataSize, f);
            fclose(f);
        }
        free(reps[i].pData);
    }
    free(reps);
}

/* Prints " key=value" for every statistic of every executable of `pipeline`. Returns a VkResult. */
static VkResult print_statistics(const Ctx *c, VkPipeline pipeline, const char *name)
{
    VkPipelineInfoKHR info;
    VkPipelineExecutablePropertiesKHR *exes = NULL;
    uint32_t n_exe = 0, e, s;
    VkResult r;

    memset(&info, 0, sizeof info);
    info.sType = VK_STRUCTURE_TYPE_PIPELINE_INFO_KHR;
    info.pipeline = pipeline;
    r = c->get_executables(c->device, &info, &n_exe, NULL);
    if (r != VK_SUCCESS) {
        return r;
    }
    exes = (VkPipelineExecutablePropertiesKHR *)calloc(n_exe ? n_exe : 1, sizeof *exes);
    if (exes == NULL) {
        return VK_ERROR_OUT_OF_HOST_MEMORY;
    }
    for (e = 0; e < n_exe; ++e) {
        exes[e].sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_PROPERTIES_KHR;
    }
    r = c->get_executables(c->device, &info, &n_exe, exes);
    if (r != VK_SUCCESS && r != VK_INCOMPLETE) {
        free(exes);
        return r;
    }
    printf(" executables=%" PRIu32, n_exe);
    for (e = 0; e < n_exe; ++e) {
        VkPipelineExecutableInfoKHR einfo;
        VkPipelineExecutableStatisticKHR *stats;
        uint32_t n_stat = 0;
        char prefix[32];

        if (n_exe > 1) {
            snprintf(prefix, sizeof prefix, "e%" PRIu32 ".", e);
        } else {
            prefix[0] = '\0';
        }
        putchar(' ');
        print_key(prefix, "subgroupSize");
        printf("=%" PRIu32, exes[e].subgroupSize);

        memset(&einfo, 0, sizeof einfo);
        einfo.sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_INFO_KHR;
        einfo.pipeline = pipeline;
        einfo.executableIndex = e;
        r = c->get_statistics(c->device, &einfo, &n_stat, NULL);
        if (r != VK_SUCCESS) {
            free(exes);
            return r;
        }
        stats = (VkPipelineExecutableStatisticKHR *)calloc(n_stat ? n_stat : 1, sizeof *stats);
        if (stats == NULL) {
            free(exes);
            return VK_ERROR_OUT_OF_HOST_MEMORY;
        }
        for (s = 0; s < n_stat; ++s) {
            stats[s].sType = VK_STRUCTURE_TYPE_PIPELINE_EXECUTABLE_STATISTIC_KHR;
        }
        r = c->get_statistics(c->device, &einfo, &n_stat, stats);
        if (r != VK_SUCCESS && r != VK_INCOMPLETE) {
            free(stats);
            free(exes);
            return r;
        }
        for (s = 0; s < n_stat; ++s) {
            putchar(' ');
            print_key(prefix, stats[s].name);
            switch (stats[s].format) {
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_BOOL32_KHR:
                printf("=%s", stats[s].value.b32 ? "true" : "false");
                break;
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_INT64_KHR:
                printf("=%" PRId64, stats[s].value.i64);
                break;
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_UINT64_KHR:
                printf("=%" PRIu64, stats[s].value.u64);
                break;
            case VK_PIPELINE_EXECUTABLE_STATISTIC_FORMAT_FLOAT64_KHR:
                printf("=%.6g", stats[s].value.f64);
                break;
            default:
                printf("=?format%d", (int)stats[s].format);
                break;
            }
        }
        free(stats);
        if (c->ir_dir != NULL && c->get_representations != NULL) {
            dump_representations(c, &einfo, name, prefix);
        }
    }
    free(exes);
    return VK_SUCCESS;
}

/* One input line: creates, reports and destroys its pipeline. Always prints one output line. */
static void run_line(const Ctx *c, char *line)
{
    const char *sep = " \t\r\n";
    char *name = strtok(line, sep), *path, *tok;
    uint32_t constants[MAX_CONSTANTS];
    VkSpecializationMapEntry entries[MAX_CONSTANTS];
    uint32_t n_const = 0, i;
    uint32_t *words = NULL;
    size_t n_words = 0;
    VkShaderModule module = VK_NULL_HANDLE;
    VkDescriptorSetLayout set_layout = VK_NULL_HANDLE;
    VkPipelineLayout layout = VK_NULL_HANDLE;
    VkPipeline pipeline = VK_NULL_HANDLE;
    VkDescriptorSetLayoutBinding bindings[N_BINDINGS];
    VkShaderModuleCreateInfo smci;
    VkDescriptorSetLayoutCreateInfo dslci;
    VkPushConstantRange push;
    VkPipelineLayoutCreateInfo plci;
    VkSpecializationInfo spec;
    VkComputePipelineCreateInfo cpci;
    VkResult r;

    if (name == NULL || name[0] == '#') {
        return;
    }
    path = strtok(NULL, sep);
    if (path == NULL) {
        printf("%s error=parse reason=no_spirv_path\n", name);
        return;
    }
    while ((tok = strtok(NULL, sep)) != NULL) {
        char *end = NULL;
        unsigned long v;
        if (n_const == MAX_CONSTANTS) {
            printf("%s error=parse reason=over_%u_constants\n", name, MAX_CONSTANTS);
            return;
        }
        errno = 0;
        v = strtoul(tok, &end, 0);
        if (errno != 0 || end == tok || *end != '\0' || v > 0xFFFFFFFFul) {
            printf("%s error=parse reason=bad_constant_%" PRIu32 "\n", name, n_const);
            return;
        }
        constants[n_const] = (uint32_t)v;
        entries[n_const].constantID = n_const;
        entries[n_const].offset = n_const * (uint32_t)sizeof(uint32_t);
        entries[n_const].size = sizeof(uint32_t);
        ++n_const;
    }

    words = read_spirv(path, &n_words);
    if (words == NULL) {
        printf("%s error=read reason=not_a_spirv_file\n", name);
        return;
    }
    if (uses_coopmat(words, n_words) && !c->have_coopmat) {
        /* Creating it would be invalid usage (and some drivers abort on it). */
        printf("%s error=%d reason=no_cooperative_matrix\n", name, (int)VK_ERROR_FEATURE_NOT_PRESENT);
        free(words);
        return;
    }

    memset(&smci, 0, sizeof smci);
    smci.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO;
    smci.codeSize = n_words * 4;
    smci.pCode = words;
    r = vkCreateShaderModule(c->device, &smci, NULL, &module);
    free(words);
    if (r != VK_SUCCESS) {
        printf("%s error=%d reason=vkCreateShaderModule\n", name, (int)r);
        return;
    }

    for (i = 0; i < N_BINDINGS; ++i) {
        memset(&bindings[i], 0, sizeof bindings[i]);
        bindings[i].binding = i;
        bindings[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
        bindings[i].descriptorCount = 1;
        bindings[i].stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
    }
    memset(&dslci, 0, sizeof dslci);
    dslci.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO;
    dslci.bindingCount = N_BINDINGS;
    dslci.pBindings = bindings;
    r = vkCreateDescriptorSetLayout(c->device, &dslci, NULL, &set_layout);
    if (r != VK_SUCCESS) {
        printf("%s error=%d reason=vkCreateDescriptorSetLayout\n", name, (int)r);
        set_layout = VK_NULL_HANDLE;
        goto done;
    }

    memset(&push, 0, sizeof push);
    push.stageFlags = VK_SHADER_STAGE_COMPUTE_BIT;
    push.offset = 0;
    push.size = PUSH_BYTES;
    memset(&plci, 0, sizeof plci);
    plci.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO;
    plci.setLayoutCount = 1;
    plci.pSetLayouts = &set_layout;
    plci.pushConstantRangeCount = 1;
    plci.pPushConstantRanges = &push;
    r = vkCreatePipelineLayout(c->device, &plci, NULL, &layout);
    if (r != VK_SUCCESS) {
        printf("%s error=%d reason=vkCreatePipelineLayout\n", name, (int)r);
        layout = VK_NULL_HANDLE;
        goto done;
    }

    memset(&spec, 0, sizeof spec);
    spec.mapEntryCount = n_const;
    spec.pMapEntries = n_const ? entries : NULL;
    spec.dataSize = n_const * sizeof(uint32_t);
    spec.pData = n_const ? constants : NULL;
    memset(&cpci, 0, sizeof cpci);
    cpci.sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO;
    cpci.flags = c->have_stats ? VK_PIPELINE_CREATE_CAPTURE_STATISTICS_BIT_KHR : 0;
    if (c->have_stats && c->ir_dir != NULL && c->get_representations != NULL) {
        cpci.flags |= VK_PIPELINE_CREATE_CAPTURE_INTERNAL_REPRESENTATIONS_BIT_KHR;
    }
    cpci.stage.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO;
    cpci.stage.stage = VK_SHADER_STAGE_COMPUTE_BIT;
    cpci.stage.module = module;
    cpci.stage.pName = "main";
    cpci.stage.pSpecializationInfo = &spec;
    cpci.layout = layout;
    cpci.basePipelineIndex = -1;
    r = vkCreateComputePipelines(c->device, VK_NULL_HANDLE, 1, &cpci, NULL, &pipeline);
    if (r != VK_SUCCESS) {
        /* The spec lets a failed create leave handles; destroying VK_NULL_HANDLE is a no-op. */
        printf("%s error=%d\n", name, (int)r);
        if (pipeline != VK_NULL_HANDLE) {
            vkDestroyPipeline(c->device, pipeline, NULL);
            pipeline = VK_NULL_HANDLE;
        }
        goto done;
    }

    fputs(name, stdout);
    if (c->have_stats) {
        r = print_statistics(c, pipeline, name);
        if (r != VK_SUCCESS) {
            printf(" error=%d reason=statistics", (int)r);
        }
    } else {
        fputs(" created=1", stdout);
    }
    putchar('\n');

done:
    if (pipeline != VK_NULL_HANDLE) {
        vkDestroyPipeline(c->device, pipeline, NULL);
    }
    if (layout != VK_NULL_HANDLE) {
        vkDestroyPipelineLayout(c->device, layout, NULL);
    }
    if (set_layout != VK_NULL_HANDLE) {
        vkDestroyDescriptorSetLayout(c->device, set_layout, NULL);
    }
    vkDestroyShaderModule(c->device, module, NULL);
}

int main(void)
{
    Ctx c;
    static char line[LINE_MAX_CHARS];
    int status;

    memset(&c, 0, sizeof c);
    status = setup(&c);
    if (status != 0) {
        return status;
    }
    while (fgets(line, sizeof line, stdin) != NULL) {
        size_t len = strlen(line);
        if (len == sizeof line - 1 && line[len - 1] != '\n' && !feof(stdin)) {
            int ch;
            char *name = strtok(line, " \t");
            printf("%s error=parse reason=line_too_long\n", name ? name : "?");
            while ((ch = getchar()) != EOF && ch != '\n') {
            }
            fflush(stdout);
            continue;
        }
        run_line(&c, line);
        fflush(stdout);
    }
    cleanup(&c);
    return 0;
}
