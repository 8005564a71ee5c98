// A process-wide pool of native threads for the batch solver.
//
// run_parallel(task, context, helpers) calls task(context) on the calling
// thread and on up to `helpers` pool threads at once. The task is expected to
// pull work items from a shared counter until none are left, so the call
// returns as soon as the caller's own share is done and every pool thread
// that joined has finished its item: a helper that wakes up late (a busy
// machine) finds the job closed and never delays the caller. Threads are
// created on first need and kept, so repeated calls pay no start-up cost.
#pragma once

#include <cstdint>

namespace fastvlp {
namespace lsap {

using ParallelTask = void (*)(void* context);

// `task` must not throw.
void run_parallel(ParallelTask task, void* context, int64_t helpers);

}  // namespace lsap
}  // namespace fastvlp
