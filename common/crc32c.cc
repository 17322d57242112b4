#include "common/crc32c.h"

#include <isa-l/crc.h>

namespace siterep {

uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t length) {
  // ISA-L's crc32_iscsi works on the non-inverted register; the standard CRC32C inverts
  // the register on the way in and on the way out.
  return ~crc32_iscsi(static_cast<unsigned char*>(const_cast<void*>(data)),
                      static_cast<int>(length), ~crc);
}

uint32_t Crc32c(const void* data, size_t length) { return Crc32cExtend(0, data, length); }

}  // namespace siterep
