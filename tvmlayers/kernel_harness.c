/* Calls one exported tvmlayers kernel without TVM: for targets that have no TVM runtime (armv7: no wheel).
 *
 *   kernel_harness LIBRARY SYMBOL TENSOR...
 *   TENSOR = i:FILE:DTYPE:D0,D1,...   an input, read from FILE (raw little-endian elements)
 *          | o:FILE:DTYPE:D0,D1,...   an output, written to FILE after the call
 *   DTYPE  = float32 | float64 | int64
 *
 * The library is dlopen-ed and its packed function __tvm_ffi_<SYMBOL> is called with DLTensor arguments in
 * calling-convention order, as TVM's runtime would.  The few backend hooks such a library expects from the
 * runtime are given here: its workspace allocator and parallel launcher are data pointers the loader fills
 * (the launcher runs the tasks one after another), and the error setter is exported by this executable
 * (link with -rdynamic).  Exit status: 0 after a successful call, 1 on a kernel error, 2 on bad usage.
 * Built by tvmlayers.bundle_harness with the target's cross gcc and the tvm-ffi C headers.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <dlpack/dlpack.h>
#include <tvm/ffi/c_api.h>

#define MAX_TENSORS 16
#define MAX_DIMS 8

typedef struct {
  void* sync_handle;
  int32_t num_task;
} ParallelGroupEnv;

typedef int (*ParallelLambda)(int task_id, ParallelGroupEnv* env, void* cdata);

static int serial_launch(ParallelLambda lambda, void* cdata, int num_task) {
  ParallelGroupEnv env = {NULL, num_task > 0 ? num_task : 1};
  for (int task = 0; task < env.num_task; ++task) {
    int status = lambda(task, &env, cdata);
    if (status != 0) return status;
  }
  return 0;
}

static void* alloc_workspace(int device_type, int device_id, uint64_t nbytes, int dtype_code, int dtype_bits) {
  (void)device_type, (void)device_id, (void)dtype_code, (void)dtype_bits;
  void* ptr = NULL;
  return posix_memalign(&ptr, 64, nbytes ? nbytes : 1) == 0 ? ptr : NULL;
}

static int free_workspace(int device_type, int device_id, void* ptr) {
  (void)device_type, (void)device_id;
  free(ptr);
  return 0;
}

/* the kernel reports errors (e.g. a shape that differs from its compiled one) through this runtime call */
void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t num_parts) {
  fprintf(stderr, "kernel error: %s: ", kind);
  for (int32_t i = 0; i < num_parts; ++i) fputs(parts[i], stderr);
  fputc('\n', stderr);
}

static void set_hook(void* library, const char* name, void* function) {
  void** slot = (void**)dlsym(library, name);
  if (slot != NULL) *slot = function; /* absent when the kernel does not use it */
}

typedef struct {
  int is_output;
  const char* path;
  DLTensor tensor;
  int64_t shape[MAX_DIMS];
  size_t bytes;
} Argument;

static int parse_argument(char* text, Argument* arg) {
  char* kind = strtok(text, ":");
  char* path = strtok(NULL, ":");
  char* dtype = strtok(NULL, ":");
  char* dims = strtok(NULL, ":");
  if (kind == NULL || path == NULL || dtype == NULL || dims == NULL || (kind[0] != 'i' && kind[0] != 'o')) return -1;
  arg->is_output = kind[0] == 'o';
  arg->path = path;
  DLDataType type = {kDLFloat, 32, 1};
  if (strcmp(dtype, "float64") == 0) {
    type.bits = 64;
  } else if (strcmp(dtype, "int64") == 0) {
    type.code = kDLInt, type.bits = 64;
  } else if (strcmp(dtype, "float32") != 0) {
    return -1;
  }
  int ndim = 0;
  size_t elements = 1;
  for (char* dim = strtok(dims, ","); dim != NULL; dim = strtok(NULL, ",")) {
    if (ndim == MAX_DIMS) return -1;
    arg->shape[ndim] = strtoll(dim, NULL, 10);
    elements *= (size_t)arg->shape[ndim++];
  }
  arg->bytes = elements * type.bits / 8;
  arg->tensor = (DLTensor){NULL, {kDLCPU, 0}, ndim, type, arg->shape, NULL, 0};
  return 0;
}

static int transfer(Argument* arg, int write) {
  FILE* file = fopen(arg->path, write ? "wb" : "rb");
  if (file == NULL) return -1;
  size_t done = write ? fwrite(arg->tensor.data, 1, arg->bytes, file) : fread(arg->tensor.data, 1, arg->bytes, file);
  fclose(file);
  return done == arg->bytes ? 0 : -1;
}

int main(int argc, char** argv) {
  if (argc < 4 || argc - 3 > MAX_TENSORS) {
    fprintf(stderr, "usage: %s LIBRARY SYMBOL TENSOR... (at most %d tensors)\n", argv[0], MAX_TENSORS);
    return 2;
  }
  void* library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (library == NULL) {
    fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  set_hook(library, "__TVMBackendParallelLaunch", (void*)serial_launch);
  set_hook(library, "__TVMBackendAllocWorkspace", (void*)alloc_workspace);
  set_hook(library, "__TVMBackendFreeWorkspace", (void*)free_workspace);
  char name[256];
  snprintf(name, sizeof name, "__tvm_ffi_%s", argv[2]);
  TVMFFISafeCallType function = (TVMFFISafeCallType)dlsym(library, name);
  if (function == NULL) {
    fprintf(stderr, "%s has no function %s\n", argv[1], name);
    return 2;
  }
  int count = argc - 3;
  Argument args[MAX_TENSORS];
  TVMFFIAny packed[MAX_TENSORS];
  for (int i = 0; i < count; ++i) {
    if (parse_argument(argv[i + 3], &args[i]) != 0) {
      fprintf(stderr, "bad tensor argument %d: expected i|o:FILE:float32|float64|int64:D0,D1,...\n", i + 1);
      return 2;
    }
    args[i].tensor.data = alloc_workspace(0, 0, args[i].bytes, 0, 0);
    if (!args[i].is_output && transfer(&args[i], 0) != 0) {
      fprintf(stderr, "cannot read %zu bytes from %s\n", args[i].bytes, args[i].path);
      return 2;
    }
    memset(&packed[i], 0, sizeof packed[i]);
    packed[i].type_index = kTVMFFIDLTensorPtr;
    packed[i].v_ptr = &args[i].tensor;
  }
  TVMFFIAny result;
  memset(&result, 0, sizeof result);
  result.type_index = kTVMFFINone;
  if (function(NULL, packed, count, &result) != 0) return 1;
  for (int i = 0; i < count; ++i) {
    if (args[i].is_output && transfer(&args[i], 1) != 0) {
      fprintf(stderr, "cannot write %s\n", args[i].path);
      return 2;
    }
  }
  return 0;
}
