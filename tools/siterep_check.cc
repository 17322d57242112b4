// siterep-check: is a replica a crash-consistent point of its primary? For each disk give
// the pre-image (the disk when its log began), the primary's change log (a log folder or
// the archive from `siterepd --archive-logs`) and the replica image; the check passes when
// every replica equals its pre-image plus the log through one and the same cycle
// (tracker/prefix_check.h). Run it while the replica is quiet.
//
//   siterep-check [--work-dir DIR] PRE LOG REPLICA [PRE LOG REPLICA ...]
//
// Exit codes: 0 consistent (prints the cycle), 1 not consistent or an error, 2 usage.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "tracker/prefix_check.h"

int main(int argc, char** argv) {
  CLI::App app{
      "siterep-check: is each replica the pre-image plus a prefix of the log, cut at one cycle?"};
  std::vector<std::string> args;
  std::string work_dir = std::filesystem::temp_directory_path().string();
  app.add_option("--work-dir", work_dir, "where the work copies go (each as large as a disk)");
  app.add_option("PRE LOG REPLICA", args, "per disk: pre-image, log folder, replica image")
      ->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  if (args.size() % 3 != 0) {
    std::fprintf(stderr, "siterep-check: give PRE LOG REPLICA for each disk (%zu paths given)\n",
                 args.size());
    return 2;
  }
  std::vector<siterep::tracker::PrefixCheckDisk> disks;
  for (size_t i = 0; i < args.size(); i += 3) {
    const std::filesystem::path replica = args[i + 2];
    disks.push_back(
        {replica.stem().string() + "#" + std::to_string(i / 3), args[i], args[i + 1], replica});
  }
  auto result = siterep::tracker::CheckReplicaIsLogPrefix(disks, work_dir);
  if (!result.ok()) {
    std::fprintf(stderr, "siterep-check: %s\n", result.status().message().c_str());
    return 1;
  }
  std::fputs(result->Summary().c_str(), stdout);
  return result->cycle ? 0 : 1;
}
