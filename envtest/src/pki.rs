//! What the API server needs to start, made fresh for each control plane: a CA and a serving
//! certificate it signs, the service-account signing key, and random bearer tokens.

use std::io::Read as _;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::Error;

pub(crate) struct Pki {
    /// The CA clients trust, PEM and DER.
    pub ca_pem: String,
    pub ca_der: Vec<u8>,
    pub serving_cert_pem: String,
    pub serving_key_pem: String,
    /// ECDSA P-256: kube-apiserver signs service-account tokens with ES256 from it.
    pub sa_key_pem: String,
    pub sa_pub_pem: String,
}

impl Pki {
    /// A CA and a serving certificate valid for `addresses`, `localhost` and the in-cluster
    /// names of the API server.
    pub fn generate(addresses: &[IpAddr]) -> Result<Pki, Error> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "extproxy-envtest CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default.svc".to_owned(),
        ])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        for a in addresses {
            params.subject_alt_names.push(SanType::IpAddress(*a));
        }
        let serving = params.signed_by(&serving_key, &issuer)?;

        let sa_key = KeyPair::generate()?;
        Ok(Pki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            serving_cert_pem: serving.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_pub_pem: sa_key.public_key_pem(),
        })
    }
}

/// 128 random bits, hex: a bearer token.
pub(crate) fn random_token() -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(crate::io_err("reading /dev/urandom"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
