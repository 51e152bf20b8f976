#include "mapping_guard.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <mutex>

namespace q3p {

namespace {

// A fixed table, read by the signal handler without locks: begin == 0 marks a free slot.
constexpr int kSlots = 1024;
struct Slot {
  std::atomic<uintptr_t> begin{0}, end{0};
  std::atomic<bool> damaged{false};
};
Slot slots[kSlots];
std::mutex table_mu;  // registration only, never taken in the handler
struct sigaction previous_action;
std::once_flag installed;

void chain_to_previous(int sig, siginfo_t* info, void* context) {
  if (previous_action.sa_flags & SA_SIGINFO) {
    previous_action.sa_sigaction(sig, info, context);
  } else if (previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
    previous_action.sa_handler(sig);
  } else {
    // The default action: returning re-runs the faulting instruction, which faults again.
    signal(sig, SIG_DFL);
  }
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
  const uintptr_t page_size = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  for (Slot& slot : slots) {
    const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
    if (begin == 0 || address < begin || address >= slot.end.load(std::memory_order_acquire)) continue;
    void* page = reinterpret_cast<void*>(address & ~(page_size - 1));
    // mmap is a plain system call, safe here in practice (it is not on POSIX's list).
    if (mmap(page, page_size, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED) {
      slot.damaged.store(true, std::memory_order_release);
      return;
    }
    break;
  }
  chain_to_previous(sig, info, context);
}

void install_handler() {
  struct sigaction action {};
  action.sa_sigaction = on_sigbus;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  sigaction(SIGBUS, &action, &previous_action);
}

}  // namespace

int guard_mapping(const void* data, size_t size) {
  std::call_once(installed, install_handler);
  std::lock_guard<std::mutex> lock(table_mu);
  for (int i = 0; i < kSlots; ++i) {
    if (slots[i].begin.load() != 0) continue;
    slots[i].damaged.store(false);
    slots[i].end.store(reinterpret_cast<uintptr_t>(data) + size, std::memory_order_release);
    slots[i].begin.store(reinterpret_cast<uintptr_t>(data), std::memory_order_release);
    return i;
  }
  return -1;
}

void unguard_mapping(int slot) {
  if (slot < 0) return;
  std::lock_guard<std::mutex> lock(table_mu);
  slots[slot].begin.store(0, std::memory_order_release);
  slots[slot].end.store(0, std::memory_order_release);
}

bool mapping_damaged(int slot) { return slot >= 0 && slots[slot].damaged.load(std::memory_order_acquire); }

}  // namespace q3p
