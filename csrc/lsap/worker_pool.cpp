#include "worker_pool.h"

#include <pthread.h>

#include <condition_variable>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace fastvlp {
namespace lsap {
namespace {

struct Job {
  ParallelTask task;
  void* context;
  int64_t open_slots;  // helpers that may still join
  int64_t active = 0;  // helpers inside task()
  bool closed = false;
};

class WorkerPool {
 public:
  void run(ParallelTask task, void* context, int64_t helpers) {
    Job job{task, context, helpers};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      grow(helpers);
      jobs_.push_back(&job);
    }
    wake_.notify_all();
    task(context);
    std::unique_lock<std::mutex> lock(mutex_);
    job.closed = true;
    remove(&job);
    finished_.wait(lock, [&] { return job.active == 0; });
  }

 private:
  // Called with mutex_ held. If the OS refuses a thread, the existing ones
  // (and the caller) still complete the job.
  void grow(int64_t size) {
    while (int64_t(threads_) < size) {
      try {
        std::thread([this] { work(); }).detach();
      } catch (const std::system_error&) {
        return;
      }
      ++threads_;
    }
  }

  Job* open_job() const {
    for (Job* job : jobs_) {
      if (!job->closed && job->open_slots > 0) return job;
    }
    return nullptr;
  }

  void remove(Job* job) {
    for (size_t k = 0; k < jobs_.size(); ++k) {
      if (jobs_[k] == job) {
        jobs_.erase(jobs_.begin() + std::ptrdiff_t(k));
        return;
      }
    }
  }

  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return open_job() != nullptr; });
      Job* job = open_job();
      --job->open_slots;
      ++job->active;
      lock.unlock();
      job->task(job->context);
      lock.lock();
      // The caller frees the job only after seeing active == 0 under the lock.
      if (--job->active == 0 && job->closed) finished_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable finished_;
  std::vector<Job*> jobs_;
  size_t threads_ = 0;
};

// The pool is never destroyed (its detached threads may be waiting on it at
// exit). A forked child has none of the parent's threads, so it starts a new
// pool and leaks the old one, whose mutex may have been held at fork time.
std::mutex pool_mutex;
WorkerPool* pool = nullptr;

void before_fork() { pool_mutex.lock(); }
void after_fork_in_parent() { pool_mutex.unlock(); }
void after_fork_in_child() {
  pool = nullptr;
  pool_mutex.unlock();
}

WorkerPool& instance() {
  std::lock_guard<std::mutex> lock(pool_mutex);
  if (pool == nullptr) {
    static const bool registered = [] {
      pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
      return true;
    }();
    (void)registered;
    pool = new WorkerPool();
  }
  return *pool;
}

}  // namespace

void run_parallel(ParallelTask task, void* context, int64_t helpers) {
  if (helpers <= 0) {
    task(context);
    return;
  }
  instance().run(task, context, helpers);
}

}  // namespace lsap
}  // namespace fastvlp
