// TestPki (tests only): a throwaway certificate authority and site certificates for the
// replication link's TLS, made with the OpenSSL C API in a folder the test owns (e.g. a
// siterep::testing::TempDir). EC P-256 keys, so a certificate costs about a millisecond.
//
//   Result<TestPki> pki = TestPki::Create(dir.path() / "pki");
//   ASSERT_TRUE(pki.ok()) << pki.status().ToString();
//   TlsIdentity east = pki->Site("east");
//   TlsIdentity old = pki->Site("west", {.not_after = -std::chrono::hours(1)});  // expired
//
// A site certificate names the site in subjectAltName DNS and in the CN (what TlsConnect
// and TlsAccept check), and is good for both TLS client and server use. Create writes
// dir/ca.pem and dir/ca.key; Site writes dir/<stem>.pem and dir/<stem>.key (stem defaults
// to the site name), replacing files of the same name. Use one folder per CA.
// Thread-compatible; TestPki holds only paths and is cheap to copy.
#pragma once

#include <chrono>
#include <filesystem>
#include <string>

#include "common/status.h"
#include "shipper/tls.h"

namespace siterep::shipper::testing {

struct SiteCertOptions {
  // Validity window relative to now; a negative not_after makes an expired certificate,
  // a positive not_before one that is not yet valid.
  std::chrono::seconds not_before = -std::chrono::hours(1);
  std::chrono::seconds not_after = std::chrono::hours(24);
  // False: the name is only in the CN (exercises the CN fallback of the name check).
  bool subject_alt_name = true;
  // File name stem in the folder; empty means the site name.
  std::string file_stem;
};

class TestPki {
 public:
  // Makes dir (if needed) and a fresh CA in it: a self-signed certificate with
  // subject CN=ca_name, valid from an hour ago for ten years.
  static Result<TestPki> Create(const std::filesystem::path& dir,
                                const std::string& ca_name = "siterep test CA");

  // Issues a certificate for site `name` signed by this CA; returns the identity (this CA,
  // the new certificate and key) ready for TlsContext::Create.
  Result<TlsIdentity> Issue(const std::string& name, const SiteCertOptions& options = {}) const;
  // Issue, for tests: prints the error and aborts if the files cannot be made.
  TlsIdentity Site(const std::string& name, const SiteCertOptions& options = {}) const;

  const std::filesystem::path& dir() const { return dir_; }
  const std::filesystem::path& ca_cert() const { return ca_cert_; }
  const std::filesystem::path& ca_key() const { return ca_key_; }

 private:
  TestPki() = default;
  std::filesystem::path dir_;
  std::filesystem::path ca_cert_;
  std::filesystem::path ca_key_;
};

}  // namespace siterep::shipper::testing
