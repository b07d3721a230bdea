//! The machine's CA store, checked once at start by the roles that open TLS connections with it (the
//! controller to AWS). Without a bundle the AWS SDK would fail deep inside its TLS setup (a panic
//! in debug builds, an "unknown issuer" error on every call otherwise); this says what is missing
//! and how to fix it before anything runs. The Kubernetes client needs none of it: it trusts the
//! CA in its kubeconfig or service account.

/// Where the native loader looks when told to (else the platform's usual paths).
const CERT_FILE_VAR: &str = "SSL_CERT_FILE";
const CERT_DIR_VAR: &str = "SSL_CERT_DIR";

/// No usable certificate in the machine's CA store.
#[derive(Debug, thiserror::Error)]
#[error(
    "no CA certificates found in the machine's CA store ({searched}){problems}: TLS to AWS cannot be \
     verified. Install the `ca-certificates` package (the project's image has \
     /etc/ssl/certs/ca-certificates.crt), or point SSL_CERT_FILE at a PEM bundle (SSL_CERT_DIR at a \
     directory of PEM files)"
)]
pub struct MissingCaStore {
    searched: String,
    problems: String,
}

/// Whether the AWS calls go over TLS: yes, unless every service's endpoint is overridden with a
/// plain `http://` URL (`AWS_ENDPOINT_URL`, as in a test bed).
pub fn aws_needs_ca_store(endpoint_url: Option<&str>) -> bool {
    !endpoint_url.is_some_and(|url| url.trim_start().starts_with("http://"))
}

/// Loads the CA store the way the AWS SDK does; `Ok(n)` with the number of certificates found.
pub fn require_native_roots() -> Result<usize, MissingCaStore> {
    let found = rustls_native_certs::load_native_certs();
    if !found.certs.is_empty() {
        return Ok(found.certs.len());
    }
    let overrides: Vec<String> = [CERT_FILE_VAR, CERT_DIR_VAR]
        .into_iter()
        .filter_map(|var| std::env::var(var).ok().map(|value| format!("{var}={value}")))
        .collect();
    let searched = if overrides.is_empty() {
        "the system's default paths".to_owned()
    } else {
        overrides.join(", ")
    };
    let problems = found
        .errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    Err(MissingCaStore {
        searched,
        problems: if problems.is_empty() {
            String::new()
        } else {
            format!(": {problems}")
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_needs_the_ca_store_unless_its_endpoint_is_plain_http() {
        assert!(aws_needs_ca_store(None));
        assert!(aws_needs_ca_store(Some(
            "https://autoscaling.eu-west-1.amazonaws.com"
        )));
        assert!(!aws_needs_ca_store(Some("http://127.0.0.1:5000")));
    }
}
