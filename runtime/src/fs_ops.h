// Renames that rename(2) cannot do, for the converter's commit: without replacing the target, and
// swapping two paths. Each returns 0, or the errno of the failure (ENOSYS where the system has no
// renameat2, EINVAL where the filesystem does not support the flag: the caller then falls back).
#pragma once
#include <string>

namespace q3p {

// Fails with EEXIST, atomically, when `to` exists.
int rename_noreplace(const std::string& from, const std::string& to);

// Swaps the two paths atomically; both must exist.
int rename_exchange(const std::string& a, const std::string& b);

}  // namespace q3p
