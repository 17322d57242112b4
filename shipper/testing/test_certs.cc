#include "shipper/testing/test_certs.h"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <cstdio>
#include <cstdlib>
#include <memory>

#include "common/file_util.h"
#include "shipper/openssl_ptr.h"

namespace siterep::shipper::testing {
namespace {

namespace fs = std::filesystem;


Status OpenSslError(std::string what) {
  char buf[256] = "";
  unsigned long e = ERR_get_error();
  if (e != 0) ERR_error_string_n(e, buf, sizeof(buf));
  ERR_clear_error();
  return Status::Error(EIO, what + ": " + buf);
}

Result<PkeyPtr> NewKey() {
  PkeyPtr key(EVP_EC_gen("P-256"));
  if (key == nullptr) return OpenSslError("EC P-256 key generation");
  return key;
}

// Adds an extension written in openssl.cnf syntax (e.g. "critical,CA:TRUE").
Status AddExtension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  ExtensionPtr ext(X509V3_EXT_nconf_nid(nullptr, &ctx, nid, value));
  if (ext == nullptr || X509_add_ext(cert, ext.get(), -1) != 1) {
    return OpenSslError(std::string("certificate extension ") + OBJ_nid2sn(nid) + "=" + value);
  }
  return Status::Ok();
}

// An unsigned v3 certificate for key, named cn, valid [now + not_before, now + not_after],
// issued by issuer (nullptr: self-issued). The caller adds extensions, then Sign()s it.
Result<X509Ptr> NewCert(EVP_PKEY* key, const std::string& cn, std::chrono::seconds not_before,
                        std::chrono::seconds not_after, X509* issuer) {
  X509Ptr cert(X509_new());
  if (cert == nullptr) return OpenSslError("X509_new");
  X509* c = cert.get();
  // A random 64-bit serial: certificates from one CA must not share one.
  unsigned char serial_bytes[8];
  if (X509_set_version(c, X509_VERSION_3) != 1 ||
      RAND_bytes(serial_bytes, sizeof(serial_bytes)) != 1) {
    return OpenSslError("certificate serial");
  }
  serial_bytes[0] &= 0x7f;  // positive
  BIGNUM* serial = BN_bin2bn(serial_bytes, sizeof(serial_bytes), nullptr);
  bool serial_set =
      serial != nullptr && BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(c)) != nullptr;
  BN_free(serial);
  if (!serial_set) return OpenSslError("certificate serial");
  if (X509_gmtime_adj(X509_getm_notBefore(c), not_before.count()) == nullptr ||
      X509_gmtime_adj(X509_getm_notAfter(c), not_after.count()) == nullptr) {
    return OpenSslError("certificate validity");
  }
  X509_NAME* subject = X509_get_subject_name(c);
  if (X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1,
                                 0) != 1 ||
      X509_set_issuer_name(c, issuer != nullptr ? X509_get_subject_name(issuer) : subject) != 1 ||
      X509_set_pubkey(c, key) != 1) {
    return OpenSslError("certificate subject");
  }
  SR_RETURN_IF_ERROR(
      AddExtension(c, issuer != nullptr ? issuer : c, NID_subject_key_identifier, "hash"));
  SR_RETURN_IF_ERROR(AddExtension(c, issuer != nullptr ? issuer : c, NID_authority_key_identifier,
                                  "keyid:always"));
  return cert;
}

Status Sign(X509* cert, EVP_PKEY* issuer_key) {
  if (X509_sign(cert, issuer_key, EVP_sha256()) <= 0) return OpenSslError("X509_sign");
  return Status::Ok();
}

Status WritePem(const fs::path& path, X509* cert, EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr) return OpenSslError("BIO_new");
  bool ok = cert != nullptr ? PEM_write_bio_X509(bio.get(), cert) == 1
                            : PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr,
                                                       nullptr) == 1;
  if (!ok) return OpenSslError("PEM encoding for " + path.string());
  char* data = nullptr;
  long length = BIO_get_mem_data(bio.get(), &data);
  // WriteFileAtomic makes the file 0600, which a key needs.
  return WriteFileAtomic(path, std::string_view(data, length));
}

Result<X509Ptr> ReadCert(const fs::path& path) {
  BioPtr bio(BIO_new_file(path.c_str(), "r"));
  X509Ptr cert(bio != nullptr ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (cert == nullptr) return OpenSslError("read certificate " + path.string());
  return cert;
}

Result<PkeyPtr> ReadKey(const fs::path& path) {
  BioPtr bio(BIO_new_file(path.c_str(), "r"));
  PkeyPtr key(bio != nullptr ? PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr)
                             : nullptr);
  if (key == nullptr) return OpenSslError("read key " + path.string());
  return key;
}

}  // namespace

Result<TestPki> TestPki::Create(const fs::path& dir, const std::string& ca_name) {
  SR_RETURN_IF_ERROR(MakeDirs(dir));
  TestPki pki;
  pki.dir_ = dir;
  pki.ca_cert_ = dir / "ca.pem";
  pki.ca_key_ = dir / "ca.key";
  SR_ASSIGN_OR_RETURN(PkeyPtr key, NewKey());
  SR_ASSIGN_OR_RETURN(X509Ptr cert, NewCert(key.get(), ca_name, -std::chrono::hours(1),
                                            std::chrono::hours(24 * 3650), nullptr));
  SR_RETURN_IF_ERROR(
      AddExtension(cert.get(), cert.get(), NID_basic_constraints, "critical,CA:TRUE"));
  SR_RETURN_IF_ERROR(
      AddExtension(cert.get(), cert.get(), NID_key_usage, "critical,keyCertSign,cRLSign"));
  SR_RETURN_IF_ERROR(Sign(cert.get(), key.get()));
  SR_RETURN_IF_ERROR(WritePem(pki.ca_key_, nullptr, key.get()));
  SR_RETURN_IF_ERROR(WritePem(pki.ca_cert_, cert.get(), nullptr));
  return pki;
}

Result<TlsIdentity> TestPki::Issue(const std::string& name, const SiteCertOptions& options) const {
  SR_ASSIGN_OR_RETURN(X509Ptr ca, ReadCert(ca_cert_));
  SR_ASSIGN_OR_RETURN(PkeyPtr ca_key, ReadKey(ca_key_));
  SR_ASSIGN_OR_RETURN(PkeyPtr key, NewKey());
  SR_ASSIGN_OR_RETURN(X509Ptr cert,
                      NewCert(key.get(), name, options.not_before, options.not_after, ca.get()));
  X509* c = cert.get();
  if (options.subject_alt_name) {
    // Built as a GENERAL_NAME rather than config text, so any name is taken literally.
    GeneralNamesPtr names(GENERAL_NAMES_new());
    GENERAL_NAME* dns = GENERAL_NAME_new();
    ASN1_IA5STRING* value = ASN1_IA5STRING_new();
    if (names == nullptr || dns == nullptr || value == nullptr ||
        ASN1_STRING_set(value, name.data(), static_cast<int>(name.size())) != 1) {
      GENERAL_NAME_free(dns);
      ASN1_IA5STRING_free(value);
      return OpenSslError("subjectAltName for " + name);
    }
    GENERAL_NAME_set0_value(dns, GEN_DNS, value);
    sk_GENERAL_NAME_push(names.get(), dns);
    if (X509_add1_ext_i2d(c, NID_subject_alt_name, names.get(), 0, X509V3_ADD_DEFAULT) != 1) {
      return OpenSslError("subjectAltName for " + name);
    }
  }
  SR_RETURN_IF_ERROR(AddExtension(c, ca.get(), NID_basic_constraints, "critical,CA:FALSE"));
  SR_RETURN_IF_ERROR(AddExtension(c, ca.get(), NID_key_usage, "critical,digitalSignature"));
  // Every site is both a TLS client (shipper) and a TLS server (receiver).
  SR_RETURN_IF_ERROR(AddExtension(c, ca.get(), NID_ext_key_usage, "serverAuth,clientAuth"));
  SR_RETURN_IF_ERROR(Sign(c, ca_key.get()));

  std::string stem = options.file_stem.empty() ? name : options.file_stem;
  TlsIdentity identity{ca_cert_, dir_ / (stem + ".pem"), dir_ / (stem + ".key")};
  SR_RETURN_IF_ERROR(WritePem(identity.key, nullptr, key.get()));
  SR_RETURN_IF_ERROR(WritePem(identity.cert, c, nullptr));
  return identity;
}

TlsIdentity TestPki::Site(const std::string& name, const SiteCertOptions& options) const {
  Result<TlsIdentity> identity = Issue(name, options);
  if (!identity.ok()) {
    std::fprintf(stderr, "TestPki::Site(%s): %s\n", name.c_str(),
                 identity.status().ToString().c_str());
    std::abort();
  }
  return *identity;
}

}  // namespace siterep::shipper::testing
