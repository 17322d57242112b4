// Explicit little-endian stores and loads of fixed-size integers, so the on-disk and wire
// formats (tracker/log_format.h, shipper/wire_format.h, the applier's undo journal) do not
// depend on the host. The callers have checked the bounds.
#pragma once

#include <cstddef>
#include <cstdint>

namespace siterep {

template <typename T>
void StoreLe(std::byte* out, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) {
    out[i] = static_cast<std::byte>(static_cast<uint64_t>(value) >> (8 * i));
  }
}

template <typename T>
T LoadLe(const std::byte* in) {
  uint64_t value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) {
    value |= static_cast<uint64_t>(std::to_integer<uint8_t>(in[i])) << (8 * i);
  }
  return static_cast<T>(value);
}

}  // namespace siterep
