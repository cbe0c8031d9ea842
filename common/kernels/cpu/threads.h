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

// Whether this thread runs inside an active OpenMP parallel region (its kernels then run on it
// alone).
inline bool CpuInParallel() {
#ifdef _OPENMP
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

// Inside an OpenMP parallel region: this thread's index and the team's size (0 and 1 outside one,
// or without OpenMP).
inline int CpuTeamThread() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int CpuTeamSize() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

}  // namespace splitmoe::kernels

#endif  // SPLITMOE_COMMON_KERNELS_CPU_THREADS_H_
