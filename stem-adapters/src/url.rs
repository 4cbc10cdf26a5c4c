//! Adapter URLs: which adapter, where, and in which namespace.
//!
//! ```text
//! memory://
//! redis://[user[:password]@]host[:port][/db][?ns=name]
//! rediss://[user[:password]@]host[:port][/db][?ns=name]      (TLS)
//! ```
//!
//! The `ns` query parameter selects the namespace (default [`DEFAULT_NAMESPACE`]); every key
//! an adapter writes starts with it, so two deployments can share one server. Other query
//! parameters are handed to the driver unchanged. Error messages and logs only ever show a
//! URL through [`mask`], which replaces the password with `***`.

use stem::Error;

/// Namespace used when the URL has no `ns` parameter.
pub const DEFAULT_NAMESPACE: &str = "stem";

/// Which adapter a URL selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scheme {
    /// `memory://`: in-process broker and backend.
    Memory,
    /// `redis://`: Redis over TCP.
    Redis,
    /// `rediss://`: Redis over TLS.
    Rediss,
}

/// A parsed adapter URL.
#[derive(Clone, PartialEq, Eq)]
pub struct AdapterUrl {
    /// The adapter.
    pub scheme: Scheme,
    /// Key prefix for everything the adapter stores.
    pub namespace: String,
    /// The URL for the driver: as given, without the `ns` parameter.
    driver_url: String,
    /// The URL as given, with any password replaced by `***`.
    masked: String,
}

impl AdapterUrl {
    /// The URL to hand to the driver (contains the password, if any: never log it).
    pub fn driver_url(&self) -> &str {
        &self.driver_url
    }

    /// The URL with any password replaced by `***`: safe for messages and logs.
    pub fn masked(&self) -> &str {
        &self.masked
    }
}

impl std::fmt::Debug for AdapterUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterUrl")
            .field("scheme", &self.scheme)
            .field("namespace", &self.namespace)
            .field("url", &self.masked)
            .finish()
    }
}

impl std::fmt::Display for AdapterUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked)
    }
}

impl std::str::FromStr for AdapterUrl {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        parse(s)
    }
}

/// `url` with the password (the part after `user:` in `scheme://user:password@host`)
/// replaced by `***`. Strings that are not URLs come back unchanged.
pub fn mask(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    out.push_str(&userinfo[..=colon]);
    out.push_str("***");
    out.push_str(&rest[at..]);
    out
}

/// Parse an adapter URL.
///
/// Errors are [`Error::Config`] and name the URL with its password masked.
pub fn parse(url: &str) -> Result<AdapterUrl, Error> {
    let masked = mask(url.trim());
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(Error::Config(format!(
            "`{masked}` is not an adapter URL (expected memory://, redis:// or rediss://)"
        )));
    };
    let scheme_name = scheme.to_ascii_lowercase();
    let scheme = match scheme_name.as_str() {
        "memory" => Scheme::Memory,
        "redis" => Scheme::Redis,
        "rediss" => Scheme::Rediss,
        other => {
            return Err(Error::Config(format!(
                "unsupported adapter URL `{masked}`: unknown scheme `{other}` \
                 (expected memory://, redis:// or rediss://)"
            )));
        }
    };
    let (before_fragment, fragment) = match rest.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (rest, None),
    };
    let (location, query) = match before_fragment.split_once('?') {
        Some((l, q)) => (l, Some(q)),
        None => (before_fragment, None),
    };
    let mut namespace = None;
    let mut kept = Vec::new();
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("ns", value)) => namespace = Some(value.to_owned()),
            None if pair == "ns" => {
                return Err(Error::Config(format!(
                    "`{masked}`: the `ns` parameter needs a value (?ns=name)"
                )));
            }
            _ => kept.push(pair),
        }
    }
    let namespace = namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    check_namespace(&namespace).map_err(|why| Error::Config(format!("`{masked}`: {why}")))?;
    if scheme != Scheme::Memory {
        let host = location.rsplit_once('@').map_or(location, |(_, h)| h);
        let host = host.split('/').next().unwrap_or("");
        if host.is_empty() {
            return Err(Error::Config(format!(
                "`{masked}` names no host (expected {scheme_name}://host[:port][/db])"
            )));
        }
        if let Some(db) = location.split_once('/').map(|(_, db)| db).filter(|db| !db.is_empty()) {
            if db.parse::<u32>().is_err() {
                return Err(Error::Config(format!("`{masked}`: database `{db}` is not a number")));
            }
        }
    }
    let mut driver_url = format!("{scheme_name}://{location}");
    if !kept.is_empty() {
        driver_url.push('?');
        driver_url.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        driver_url.push('#');
        driver_url.push_str(f);
    }
    Ok(AdapterUrl { scheme, namespace, driver_url, masked })
}

/// A namespace is 1 to 64 characters out of `A-Z a-z 0-9 - _ .`.
fn check_namespace(ns: &str) -> Result<(), String> {
    if ns.is_empty() || ns.len() > 64 {
        return Err(format!("namespace `{ns}` must be 1 to 64 characters long"));
    }
    if let Some(c) = ns.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("namespace `{ns}` contains `{c}` (allowed: letters, digits, `-`, `_`, `.`)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn masks_passwords_only() {
        assert_eq!(mask("redis://user:s3cret@host:6379/0"), "redis://user:***@host:6379/0");
        assert_eq!(mask("rediss://:s3cret@host"), "rediss://:***@host");
        assert_eq!(mask("redis://user@host"), "redis://user@host");
        assert_eq!(mask("redis://host:6379/0?ns=a"), "redis://host:6379/0?ns=a");
        assert_eq!(mask("redis://u:p@ss:w@rd@host/1"), "redis://u:***@host/1");
        assert_eq!(mask("not a url"), "not a url");
    }

    #[test]
    fn parses_scheme_namespace_and_driver_url() {
        let u = parse("redis://127.0.0.1:6379/1").unwrap();
        assert_eq!(u.scheme, Scheme::Redis);
        assert_eq!(u.namespace, DEFAULT_NAMESPACE);
        assert_eq!(u.driver_url(), "redis://127.0.0.1:6379/1");

        let u = parse("REDISS://:pw@cache.example:6380/2?protocol=resp3&ns=billing#insecure").unwrap();
        assert_eq!(u.scheme, Scheme::Rediss);
        assert_eq!(u.namespace, "billing");
        assert_eq!(u.driver_url(), "rediss://:pw@cache.example:6380/2?protocol=resp3#insecure");
        assert_eq!(u.masked(), "REDISS://:***@cache.example:6380/2?protocol=resp3&ns=billing#insecure");
        assert!(!format!("{u:?} {u}").contains("pw@"), "Debug and Display never show the password");

        let u = parse("memory://").unwrap();
        assert_eq!((u.scheme, u.namespace.as_str()), (Scheme::Memory, "stem"));
    }

    #[test]
    fn bad_urls_are_config_errors_naming_the_masked_url() {
        let err = parse("foo://x").unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert!(err.to_string().contains("foo://x"), "{err}");

        let err = parse("foo://admin:hunter2@x").unwrap_err().to_string();
        assert!(err.contains("foo://admin:***@x"), "{err}");
        assert!(!err.contains("hunter2"), "{err}");

        for bad in [
            "localhost:6379",
            "redis://",
            "redis://:pw@/0",
            "redis://h/abc",
            "redis://h?ns=a:b",
            "redis://h?ns=",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad}: {err}");
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
    }
}
