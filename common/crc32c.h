// CRC32C (Castagnoli), the checksum of every log record and wire frame. Uses ISA-L's
// hardware-accelerated implementation. Thread-safe (pure functions).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

namespace siterep {

// Standard CRC32C of data (Crc32c("123456789") == 0xE3069283).
uint32_t Crc32c(const void* data, size_t length);
// Continues a CRC32C: Crc32cExtend(Crc32c(a), b) == Crc32c(a + b).
uint32_t Crc32cExtend(uint32_t crc, const void* data, size_t length);

inline uint32_t Crc32c(std::span<const std::byte> data) { return Crc32c(data.data(), data.size()); }

}  // namespace siterep
