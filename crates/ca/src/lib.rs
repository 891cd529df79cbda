#![forbid(unsafe_code)]
//! The Isthmus mesh certificate authority: CA material ([`Ca`]), join tokens
//! ([`TokenIssuer`], [`TokenLedger`]), the Istio-compatible certificate API
//! ([`CertificateService`]) and the TLS setup of port 15012 ([`server_tls_config`]).
//!
//! Root rotation is described in `ROTATION.md` beside this crate.

pub mod authority;
pub mod cert;
pub mod csr;
pub mod files;
pub mod service;
pub mod spiffe;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod tls;
pub mod token;

/// Generated from `proto/istio/v1/auth/ca.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("istio.v1.auth");
}

pub use authority::{
    Ca, CaConfig, CaError, IssuedKeyPair, ServingCertOptions, SignError, SignRequest,
};
pub use cert::{CertError, CertInfo, ChainVerifier};
pub use csr::{parse_csr, parse_csr_der, CsrError, ParsedCsr};
pub use service::{AuthError, Authenticator, CaMetrics, Caller, CertificateService, Credential};
pub use spiffe::{SpiffeError, SpiffeId};
pub use tls::{server_tls_config, tls_incoming, TlsError};
pub use token::{
    token_identity_unverified, LedgerError, MemoryLedger, TokenClaims, TokenError, TokenIssuer,
    TokenLedger, TokenRecord,
};

/// Decodes an `IstioCertificateRequest` from its protobuf bytes (fuzzing entry point).
pub fn decode_request(bytes: &[u8]) -> Result<pb::IstioCertificateRequest, prost::DecodeError> {
    prost::Message::decode(bytes)
}
