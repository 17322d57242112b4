// Status and Result<T>: errors as values, across every module boundary.
//
// A Status is ok, or an errno-style code (EIO, ENOSPC, EINVAL, ...) with a message that
// says what failed and where (which file, which offset). errno is turned into a Status
// once, at the system call, with FromErrno. The code is what a FUSE handler replies with;
// the message is what an operator reads. Result<T> holds a T or a non-ok Status.
// Thread-compatible value types.
#pragma once

#include <cerrno>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace siterep {

class [[nodiscard]] Status {
 public:
  Status() = default;  // ok

  static Status Ok() { return Status(); }
  // code must be a positive errno value.
  static Status Error(int code, std::string message) { return Status(code, std::move(message)); }
  // "context: strerror(err)".
  static Status FromErrno(int err, std::string_view context);
  static Status Invalid(std::string message) { return Status(EINVAL, std::move(message)); }
  static Status Corrupt(std::string message) { return Status(EBADMSG, std::move(message)); }

  bool ok() const { return code_ == 0; }
  int code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string ToString() const;

  // Returns a copy whose message is "context: <message>".
  Status WithContext(std::string_view context) const;

 private:
  Status(int code, std::string message) : code_(code), message_(std::move(message)) {}
  int code_ = 0;
  std::string message_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit on purpose
  Result(Status status) : v_(std::move(status)) {}  // NOLINT; status must not be ok

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace siterep

#define SR_CONCAT_INNER(a, b) a##b
#define SR_CONCAT(a, b) SR_CONCAT_INNER(a, b)

// Returns the Status of expr from the enclosing function if it is not ok.
#define SR_RETURN_IF_ERROR(expr)                   \
  do {                                             \
    ::siterep::Status sr_status_ = (expr);         \
    if (!sr_status_.ok()) return sr_status_;       \
  } while (0)

// SR_ASSIGN_OR_RETURN(auto x, MakeX()): declares x from a Result or returns its Status.
#define SR_ASSIGN_OR_RETURN(lhs, expr) \
  SR_ASSIGN_OR_RETURN_IMPL(SR_CONCAT(sr_result_, __LINE__), lhs, expr)
#define SR_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return tmp.status();            \
  lhs = std::move(tmp).value()
