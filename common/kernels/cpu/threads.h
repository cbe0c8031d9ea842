// The number of threads the CPU kernels' OpenMP regions use (the pool oneDNN shares); 1 where
// the build has no OpenMP.
#ifndef SPLITMOE_COMMON_KERNELS_CPU_THREADS_H_
#define SPLITMOE_COMMON_KERNELS_CPU_THREADS_H_

#ifdef _OPENMP
#include <omp.h>
#endif

namespace splitmoe::kernels {

inline int CpuThreads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_CPU_THREADS_H_
