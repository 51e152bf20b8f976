// Survives a rank file truncated while it is mapped. Reading a mapped page that lies past the
// file's new end raises SIGBUS, which kills the process. The guard's SIGBUS handler maps a zero
// page over the lost one, so that the reading instruction completes, and flags the mapping as
// damaged: the engine turns the flag into an error once the forward pass is over. A SIGBUS on
// any other address goes to the handler that was installed before (or kills as it would have).
#pragma once
#include <cstddef>

namespace q3p {

// Guards [data, data + size) until unguard_mapping(slot). Returns the slot, or -1 when every
// slot is taken (the mapping then goes unguarded, as before). Installs the handler once.
int guard_mapping(const void* data, size_t size);
void unguard_mapping(int slot);
// True once a page of the slot's mapping was lost. Sticky until the slot is released.
bool mapping_damaged(int slot);

}  // namespace q3p
