//! The ingress's own certificates (`kilnd --ingress-tls-self-signed`): a local CA kept in
//! `KILN_HOME/tls/` and, signed by it at every start, a wildcard certificate for
//! `*.<ingress domain>` and the ingress's address, so that `https://<microvmId>.<domain>:<port>`
//! and path-style `https://<address>:<port>/m/<microvmId>` verify for any client that trusts
//! the CA (`GET /v1/ingress` hands it out; the Python SDK installs it).
//!
//! Files: `ca.pem` (0644), `ca-key.pem` (0600), `ingress.pem` (leaf + CA chain, 0644),
//! `ingress-key.pem` (0600). The CA is made once and reused; the leaf follows the domain.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

const CA_NAME: &str = "kiln ingress CA";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--ingress-domain {0:?}: a wildcard certificate needs a domain of two labels or more (for example kiln.localhost); clients refuse *.{0}")]
    Domain(String),
    #[error("Writing {path} failed")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Reading the ingress CA key {path} failed")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Making the ingress certificates failed")]
    Generate(#[from] rcgen::Error),
}

/// Where the generated files live.
pub fn dir(home: &Path) -> PathBuf {
    home.join("tls")
}

/// The CA certificate, when the ingress serves kilnd's own certificate.
pub fn own_ca(home: &Path, ingress_cert: Option<&Path>) -> Option<PathBuf> {
    (ingress_cert == Some(dir(home).join("ingress.pem").as_path()))
        .then(|| dir(home).join("ca.pem"))
}

fn write(path: &Path, data: &str, mode: u32) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    // Written beside and renamed, so a reader never sees half a file.
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Makes (or reuses) the CA and signs a fresh certificate for `*.<domain>`, `<domain>` and
/// the addresses `ips` (path-style endpoints name one) with it; returns the certificate
/// chain and key paths for the ingress.
pub fn ensure(
    home: &Path,
    domain: &str,
    ips: &[std::net::IpAddr],
) -> Result<(PathBuf, PathBuf), TlsError> {
    if domain.split('.').filter(|l| !l.is_empty()).count() < 2 {
        return Err(TlsError::Domain(domain.to_string()));
    }
    use std::os::unix::fs::DirBuilderExt;
    let dir = dir(home);
    let mkdir = |path: &Path, mode: u32| {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(path)
            .map_err(|source| TlsError::Write {
                path: path.to_path_buf(),
                source,
            })
    };
    mkdir(home, 0o700)?;
    mkdir(&dir, 0o755)?;
    let (ca_pem, ca_key_pem) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    let ca_key = if ca_pem.is_file() && ca_key_pem.is_file() {
        let pem = std::fs::read_to_string(&ca_key_pem).map_err(|source| TlsError::ReadKey {
            path: ca_key_pem.clone(),
            source,
        })?;
        KeyPair::from_pem(&pem)?
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        write(&ca_key_pem, &key.serialize_pem(), 0o600)?;
        write(&ca_pem, &cert.pem(), 0o644)?;
        tracing::info!(ca = %ca_pem.display(), "made the ingress CA");
        key
    };
    // The issuer is rebuilt from the same name and key: what a leaf's signature and
    // authority key identifier depend on, so leaves verify against the stored ca.pem.
    let issuer = ca_params()?.self_signed(&ca_key)?;
    let mut leaf = CertificateParams::new(vec![format!("*.{domain}"), domain.to_string()])?;
    leaf.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, format!("*.{domain}"));
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer, &ca_key)?;
    let ca_text = std::fs::read_to_string(&ca_pem).map_err(|source| TlsError::ReadKey {
        path: ca_pem.clone(),
        source,
    })?;
    let (cert_path, key_path) = (dir.join("ingress.pem"), dir.join("ingress-key.pem"));
    write(&key_path, &leaf_key.serialize_pem(), 0o600)?;
    write(&cert_path, &format!("{}{ca_text}", leaf_cert.pem()), 0o644)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const LO: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn the_ca_is_kept_and_keys_are_private() {
        let home = tempfile::tempdir().unwrap();
        assert!(matches!(
            ensure(home.path(), "localhost", &[]),
            Err(TlsError::Domain(_))
        ));
        let (cert, key) = ensure(home.path(), "kiln.localhost", &[LO]).unwrap();
        let ca = std::fs::read_to_string(dir(home.path()).join("ca.pem")).unwrap();
        ensure(home.path(), "other.test", &[]).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir(home.path()).join("ca.pem")).unwrap(),
            ca,
            "the CA survives restarts"
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&dir(home.path()).join("ca-key.pem")), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(
            own_ca(home.path(), Some(&cert)),
            Some(dir(home.path()).join("ca.pem"))
        );
        assert_eq!(own_ca(home.path(), None), None);
    }
}
