// PointView: read-only access to a replica's disks as of one recovery point, while the
// applier keeps applying newer cycles. Made by Replica::OpenView; used by blockdev (a
// point-in-time view or the base of a test-failover overlay, handed over by control/),
// by `siterep export` (ExportDisk) and by verification.
//
// The view pins its point (PointStore::Pin) for as long as it lives: pruning does not
// delete an undo file a live view needs, and a view of the latest point keeps reading
// that point after the applier has moved on (the applier then saves the blocks it
// overwrites for the view, so a long-lived view of the latest point costs undo space).
// The view shares ownership of the store, so it may outlive the Replica.
//
// Thread-safe: Read may be called from many threads at once; each Read sees whole cycles
// only (it holds the store's lock shared).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>

#include "applier/point_store.h"
#include "common/status.h"

namespace siterep::applier {

class PointView {
 public:
  // Pins point_id (a cycle, or kLatestPoint) of store. ENOENT: no such point.
  static Result<std::unique_ptr<PointView>> Open(std::shared_ptr<PointStore> store,
                                                 uint64_t point_id);
  ~PointView();
  PointView(const PointView&) = delete;
  PointView& operator=(const PointView&) = delete;

  const RecoveryPoint& point() const { return point_; }
  size_t disk_count() const { return store_->disk_count(); }
  uint64_t disk_size(size_t i) const { return store_->disk(i).size; }
  const std::string& disk_name(size_t i) const { return store_->disk(i).name; }

  // Fills out with [offset, offset + out.size()) of disk disk_index as of the point.
  // The range must lie within the disk (EINVAL otherwise).
  Status Read(size_t disk_index, uint64_t offset, std::span<std::byte> out) const;

 private:
  PointView(std::shared_ptr<PointStore> store, RecoveryPoint point)
      : store_(std::move(store)), point_(point) {}
  std::shared_ptr<PointStore> store_;
  RecoveryPoint point_;
};

// Writes disk disk_index of view to out_file (created or replaced; exactly the disk's
// size, with holes where the content is zeros), then fdatasyncs it.
Status ExportDisk(const PointView& view, size_t disk_index, const std::filesystem::path& out_file);

}  // namespace siterep::applier
