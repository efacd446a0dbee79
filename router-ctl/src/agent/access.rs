//! How this host reaches etcd: the endpoints, TLS (the CA that signed the server's certificate,
//! and this host's own certificate when the server asks for one) and etcd's own authentication
//! (a user and its password). One value, built once from the command line and the environment,
//! used by the CLI and by the agent alike; errors etcd answers with are explained here.
//!
//! The password never travels on the command line (where `ps` shows it): it comes from a file
//! (`--etcd-password-file`) or the environment (`ROUTER_XDP_ETCD_PASSWORD`).

use std::{path::PathBuf, time::Duration};

use anyhow::{anyhow, bail, Context as _, Result};
use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

/// The environment variable holding the etcd user's password, for those who prefer it to a
/// file (a service manager's credential, a container's secret).
pub const PASSWORD_ENV: &str = "ROUTER_XDP_ETCD_PASSWORD";

#[derive(Clone, Default)]
pub struct Access {
    pub endpoints: Vec<String>,
    /// The CA certificate (PEM) that signed the servers' certificates: TLS, verified.
    pub cacert: Option<PathBuf>,
    /// This host's certificate and key (PEM), for servers that ask for client certificates.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd's authentication: the user, and its password.
    pub user: Option<String>,
    password: Option<String>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("endpoints", &self.endpoints)
            .field("cacert", &self.cacert)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .finish()
    }
}

impl Access {
    /// From the options: `urls` comma-separated; the password read from `password_file`, else
    /// from `ROUTER_XDP_ETCD_PASSWORD`. Refuses combinations that cannot work, naming the
    /// option to change.
    pub fn new(
        urls: &str,
        cacert: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        user: Option<String>,
        password_file: Option<PathBuf>,
    ) -> Result<Access> {
        let endpoints: Vec<String> = urls
            .split(',')
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .collect();
        if endpoints.is_empty() {
            bail!("--etcd '{urls}': give at least one endpoint URL");
        }
        let tls = cacert.is_some() || cert.is_some();
        for e in &endpoints {
            let https = e.starts_with("https://");
            if !https && !e.starts_with("http://") && e.contains("://") {
                bail!("--etcd {e}: use an http:// or https:// URL");
            }
            if https && cacert.is_none() {
                bail!("--etcd {e}: an https endpoint needs the CA that signed its certificate: --etcd-cacert FILE");
            }
            if tls && e.starts_with("http://") {
                bail!("--etcd {e}: TLS options were given for a plaintext endpoint; write it https://");
            }
        }
        if cert.is_some() != key.is_some() {
            bail!("--etcd-cert and --etcd-key go together: give both or neither");
        }
        if cert.is_some() && cacert.is_none() {
            bail!("--etcd-cert: a client certificate needs TLS, and TLS the server's CA: --etcd-cacert FILE");
        }
        let password = match (&user, password_file) {
            (None, Some(_)) => bail!("--etcd-password-file without --etcd-user"),
            (None, None) => None,
            (Some(u), Some(f)) => {
                let text = std::fs::read_to_string(&f).with_context(|| {
                    format!(
                        "etcd user {u}: cannot read the password file {}",
                        f.display()
                    )
                })?;
                Some(text.trim_end_matches(['\n', '\r']).to_string())
            }
            (Some(u), None) => Some(std::env::var(PASSWORD_ENV).map_err(|_| {
                anyhow!(
                    "etcd user {u} needs a password: --etcd-password-file FILE or {PASSWORD_ENV}"
                )
            })?),
        };
        if let (Some(u), Some(p)) = (&user, &password) {
            if u.is_empty() || p.is_empty() {
                bail!("--etcd-user: the user name and its password must not be empty");
            }
        }
        Ok(Access {
            endpoints,
            cacert,
            cert,
            key,
            user,
            password,
        })
    }

    /// Plain access to `urls` (tests, tools).
    pub fn plain(urls: &str) -> Result<Access> {
        Access::new(urls, None, None, None, None, None)
    }

    pub fn urls(&self) -> String {
        self.endpoints.join(",")
    }

    /// The client options: TLS and the user, on top of `base` (timeouts, keep-alive).
    pub fn options(&self, base: ConnectOptions) -> Result<ConnectOptions> {
        let mut o = base;
        if let Some(ca) = &self.cacert {
            let read = |p: &PathBuf, what: &str| {
                std::fs::read(p)
                    .with_context(|| format!("cannot read the etcd {what} {}", p.display()))
            };
            let mut tls = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
            if let (Some(c), Some(k), false) = (
                &self.cert,
                &self.key,
                cfg!(mutant = "etcd_client_cert_dropped"),
            ) {
                tls = tls.identity(Identity::from_pem(
                    read(c, "client certificate")?,
                    read(k, "client key")?,
                ));
            }
            o = o.with_tls(tls);
        }
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            o = o.with_user(u.clone(), p.clone());
        }
        Ok(o)
    }

    /// Connects, within `within`; the error says what to check.
    pub async fn connect(
        &self,
        base: ConnectOptions,
        within: Duration,
    ) -> Result<etcd_client::Client> {
        let opts = self.options(base)?;
        match tokio::time::timeout(
            within,
            etcd_client::Client::connect(&self.endpoints, Some(opts)),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.explain(&e)),
            Err(_) => bail!(
                "etcd at {} did not answer within {within:?}; is it running{}?",
                self.urls(),
                if self.cacert.is_some() {
                    ", and does its certificate match --etcd-cacert"
                } else {
                    ""
                }
            ),
        }
    }

    /// What an etcd error means for whoever runs this, and what to do.
    pub fn explain(&self, e: &etcd_client::Error) -> anyhow::Error {
        anyhow!("{}: {e}", self.hint(e))
    }

    /// What an etcd error means, without the error itself (the same for every retry of one
    /// failure).
    pub fn hint(&self, e: &etcd_client::Error) -> String {
        let who = self
            .user
            .as_deref()
            .map(|u| format!("user {u}"))
            .unwrap_or_else(|| "no user (--etcd-user)".into());
        let text = e.to_string();
        let hint = if text.contains("user name is empty") {
            format!("etcd requires authentication and this request had {who}: give --etcd-user and its password")
        } else if text.contains("authentication failed") {
            format!("etcd refused {who}: authentication failed (wrong user or password)")
        } else if text.contains("permission denied") {
            format!("etcd refused {who}: permission denied (its role does not allow this; see the README's etcd roles)")
        } else if self.cacert.is_some()
            && [
                "transport error",
                "operation was canceled",
                "certificate",
                "tls",
                "handshake",
            ]
            .iter()
            .any(|t| text.contains(t))
        {
            format!("cannot reach etcd at {} over TLS: check that it runs, that --etcd-cacert is the CA of its certificate and, if it asks for client certificates, --etcd-cert/--etcd-key", self.urls())
        } else if text.contains("certificate") || text.contains("tls") || text.contains("handshake")
        {
            "TLS failed: check --etcd-cacert (the CA of etcd's certificate) and, if etcd asks for client certificates, --etcd-cert/--etcd-key".to_string()
        } else {
            format!("cannot reach etcd at {}", self.urls())
        };
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_combinations_are_refused_naming_the_option() {
        let p = |s: &str| Some(PathBuf::from(s));
        let err = |r: Result<Access>| format!("{:#}", r.unwrap_err());
        assert!(
            err(Access::new("https://e:2379", None, None, None, None, None))
                .contains("--etcd-cacert")
        );
        assert!(err(Access::new(
            "http://e:2379",
            p("/ca"),
            None,
            None,
            None,
            None
        ))
        .contains("https://"));
        assert!(err(Access::new(
            "https://e:2379",
            p("/ca"),
            p("/c"),
            None,
            None,
            None
        ))
        .contains("--etcd-key"));
        assert!(err(Access::new(
            "http://e:2379",
            None,
            None,
            None,
            None,
            p("/pw")
        ))
        .contains("--etcd-user"));
        assert!(err(Access::new("", None, None, None, None, None)).contains("endpoint"));
        assert!(err(Access::new("ftp://e", None, None, None, None, None)).contains("http"));
        // A password file that is not there names the user and the file.
        let e = err(Access::new(
            "http://e:2379",
            None,
            None,
            None,
            Some("agent".into()),
            p("/nonexistent/pw"),
        ));
        assert!(e.contains("agent") && e.contains("/nonexistent/pw"), "{e}");
    }

    #[test]
    fn the_password_comes_from_its_file_without_the_newline_and_is_never_printed() {
        let dir = std::env::temp_dir().join(format!("access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        let a = Access::new(
            "http://e:2379",
            None,
            None,
            None,
            Some("agent".into()),
            Some(f),
        )
        .unwrap();
        assert_eq!(a.password.as_deref(), Some("s3cret"));
        assert!(!format!("{a:?}").contains("s3cret"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
