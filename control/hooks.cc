#include "control/hooks.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/unique_fd.h"

extern char** environ;

namespace siterep::control {

namespace {
constexpr size_t kKeepOutput = 16 * 1024;

void Append(std::string* out, const char* data, size_t n) {
  out->append(data, n);
  if (out->size() > 2 * kKeepOutput) out->erase(0, out->size() - kKeepOutput);
}

std::string LastLine(const std::string& text) {
  size_t end = text.find_last_not_of("\n\r ");
  if (end == std::string::npos) return "";
  size_t start = text.rfind('\n', end);
  return text.substr(start == std::string::npos ? 0 : start + 1, end - (start == std::string::npos ? 0 : start + 1) + 1);
}

std::string Who(const HookContext& context) {
  return context.who.empty() ? "VM " + context.vm : context.who;
}
}  // namespace

std::string HookResult::Failure() const {
  if (ok()) return "";
  char took[32];
  std::snprintf(took, sizeof took, "%.1f s", seconds);
  std::string why = timed_out ? std::string("timed out (killed after ") + took + ")"
                              : "exited with " + std::to_string(exit_code);
  std::string line = LastLine(output);
  return "hook '" + command + "' " + why + (line.empty() ? "" : ": " + line);
}

nlohmann::json HookResult::ToJson() const {
  if (!ran) return nullptr;
  return {{"command", command}, {"exit_code", exit_code}, {"timed_out", timed_out},
          {"seconds", seconds}, {"output", output.size() > kKeepOutput
                                               ? output.substr(output.size() - kKeepOutput)
                                               : output}};
}

HookResult HookResult::FromJson(const nlohmann::json& json) {
  HookResult r;
  if (!json.is_object()) return r;
  r.ran = true;
  r.command = json.value("command", std::string());
  r.exit_code = json.value("exit_code", 0);
  r.timed_out = json.value("timed_out", false);
  r.seconds = json.value("seconds", 0.0);
  r.output = json.value("output", std::string());
  return r;
}

HookResult RunHook(const std::string& command, const HookContext& context,
                   std::chrono::milliseconds timeout) {
  HookResult r;
  if (command.empty()) return r;
  r.ran = true;
  r.command = command;
  const auto start = std::chrono::steady_clock::now();
  auto fail = [&](const std::string& what) {
    r.exit_code = 127;
    r.output = what + ": " + std::strerror(errno);
    spdlog::error("{}: {} hook: {}", Who(context), context.event, r.output);
    return r;
  };

  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return fail("pipe");
  UniqueFd read_end(fds[0]), write_end(fds[1]);

  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "SITEREP_", 8) != 0) env_strings.emplace_back(*e);
  }
  env_strings.push_back("SITEREP_VM=" + context.vm);
  env_strings.push_back("SITEREP_SITE=" + context.site);
  env_strings.push_back("SITEREP_EVENT=" + context.event);
  env_strings.push_back("SITEREP_MOUNTPOINT=" + context.mountpoint);
  for (const std::string& e : context.extra_env) env_strings.push_back(e);
  std::vector<char*> envp;
  for (std::string& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, write_end.get(), 1);
  posix_spawn_file_actions_adddup2(&actions, write_end.get(), 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK);
  posix_spawnattr_setpgroup(&attr, 0);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  std::string sh = "/bin/sh", dash_c = "-c", cmd = command;
  char* argv[] = {sh.data(), dash_c.data(), cmd.data(), nullptr};
  pid_t pid = -1;
  int rc = ::posix_spawn(&pid, "/bin/sh", &actions, &attr, argv, envp.data());
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  write_end.Reset();
  if (rc != 0) {
    errno = rc;
    return fail("spawn /bin/sh");
  }
  spdlog::info("{}: {} hook started (pid {}): {}", Who(context), context.event, pid, command);

  // Past the timeout: SIGTERM to the group, 5 s later SIGKILL.
  bool term_sent = false;
  auto kill_at = start + timeout;
  auto escalate = [&](std::chrono::steady_clock::time_point now) {
    if (now < kill_at) return;
    r.timed_out = true;
    ::kill(-pid, term_sent ? SIGKILL : SIGTERM);
    kill_at = now + (term_sent ? std::chrono::seconds(3600) : std::chrono::seconds(5));
    term_sent = true;
  };
  char buf[4096];
  while (true) {
    const auto now = std::chrono::steady_clock::now();
    escalate(now);
    const auto wait_ms =
        std::chrono::duration_cast<std::chrono::milliseconds>(kill_at - now).count();
    pollfd p{read_end.get(), POLLIN, 0};
    int n = ::poll(&p, 1, static_cast<int>(std::clamp<int64_t>(wait_ms, 1, 1000)));
    if (n < 0 && errno != EINTR) break;
    if (n > 0) {
      ssize_t got = ::read(read_end.get(), buf, sizeof buf);
      if (got > 0) {
        Append(&r.output, buf, static_cast<size_t>(got));
        continue;
      }
      if (got == 0) break;  // every writer closed: the shell (and what it left) is done
      if (errno != EINTR && errno != EAGAIN) break;
    }
  }
  // The pipe closed; the shell may still be exiting (or a child kept the pipe and was killed).
  int wstatus = 0;
  while (true) {
    pid_t w = ::waitpid(pid, &wstatus, WNOHANG);
    if (w == pid) break;
    if (w < 0 && errno != EINTR) break;
    escalate(std::chrono::steady_clock::now());
    ::usleep(10'000);
  }
  r.exit_code = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
  if (r.output.size() > kKeepOutput) r.output.erase(0, r.output.size() - kKeepOutput);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (r.ok()) {
    spdlog::info("{}: {} hook done in {:.1f} s", Who(context), context.event, r.seconds);
  } else {
    spdlog::error("{}: {}", Who(context), r.Failure());
  }
  return r;
}

}  // namespace siterep::control
