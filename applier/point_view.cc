#include "applier/point_view.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <vector>

#include "common/file_util.h"

namespace siterep::applier {

Result<std::unique_ptr<PointView>> PointView::Open(std::shared_ptr<PointStore> store,
                                                   uint64_t point_id) {
  SR_ASSIGN_OR_RETURN(RecoveryPoint point, store->Pin(point_id));
  return std::unique_ptr<PointView>(new PointView(std::move(store), point));
}

PointView::~PointView() { store_->Unpin(point_.id); }

Status PointView::Read(size_t disk_index, uint64_t offset, std::span<std::byte> out) const {
  return store_->Read(point_.id, disk_index, offset, out);
}

Status ExportDisk(const PointView& view, size_t disk_index, const std::filesystem::path& out_file) {
  if (disk_index >= view.disk_count()) {
    return Status::Invalid("export: no disk " + std::to_string(disk_index));
  }
  const uint64_t size = view.disk_size(disk_index);
  SR_ASSIGN_OR_RETURN(UniqueFd fd, OpenFile(out_file, O_WRONLY | O_CREAT | O_TRUNC, 0644));
  constexpr size_t kChunk = 1u << 20;
  std::vector<std::byte> buf(std::min<uint64_t>(kChunk, size));
  for (uint64_t at = 0; at < size;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), size - at));
    std::span<std::byte> chunk(buf.data(), n);
    Status s = view.Read(disk_index, at, chunk);
    if (!s.ok()) return s.WithContext("export disk " + view.disk_name(disk_index));
    // Zeros stay a hole (the file is fresh, so a hole reads as zeros).
    const bool zeros =
        std::all_of(chunk.begin(), chunk.end(), [](std::byte b) { return b == std::byte{0}; });
    if (!zeros) SR_RETURN_IF_ERROR(PWriteAll(fd.get(), chunk.data(), n, at, out_file.string()));
    at += n;
  }
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) {
    return Status::FromErrno(errno, "truncate " + out_file.string());
  }
  if (::fdatasync(fd.get()) != 0) return Status::FromErrno(errno, "fdatasync " + out_file.string());
  return Status::Ok();
}

}  // namespace siterep::applier
