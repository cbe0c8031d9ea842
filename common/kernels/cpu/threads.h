// The OpenMP pool the CPU kernels (and oneDNN) run on, asked about from any file: these are
// defined in threads.cc, which is built with OpenMP, so a caller built without it (the engine,
// the benchmarks) gets the pool's real answers. (As inline functions they answered "1 thread" in
// those files, and differently from the kernels': one function with two definitions.)
#ifndef SPLITMOE_COMMON_KERNELS_CPU_THREADS_H_
#define SPLITMOE_COMMON_KERNELS_CPU_THREADS_H_

namespace splitmoe::kernels {

// The number of threads the CPU kernels' parallel regions use; 1 where the build has no OpenMP.
int CpuThreads();

// Whether this thread runs inside an active OpenMP parallel region (its kernels then run on it
// alone).
bool CpuInParallel();

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_CPU_THREADS_H_
