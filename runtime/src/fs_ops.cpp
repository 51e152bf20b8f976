#include "fs_ops.h"

#include <fcntl.h>  // AT_FDCWD

#include <cerrno>
#include <cstdio>  // renameat2 and its flags (glibc 2.28+, _GNU_SOURCE)

namespace q3p {

namespace {

#ifdef RENAME_NOREPLACE
int rename_with_flags(const std::string& from, const std::string& to, unsigned flags) {
  return renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), flags) == 0 ? 0 : errno;
}
#else
constexpr unsigned RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2;
int rename_with_flags(const std::string&, const std::string&, unsigned) { return ENOSYS; }
#endif

}  // namespace

int rename_noreplace(const std::string& from, const std::string& to) {
  return rename_with_flags(from, to, RENAME_NOREPLACE);
}

int rename_exchange(const std::string& a, const std::string& b) { return rename_with_flags(a, b, RENAME_EXCHANGE); }

}  // namespace q3p
