//! Where the node may post a client's change notifications.
//!
//! A notification carries patient data to whatever URL a subscription names, so the URL is
//! not the client's to choose alone: the node's operator allows each client the origins it
//! may be notified at (`caremesh api-client add --notify-to ORIGIN`), and a subscription to
//! any other origin is refused. Deny unless allowed: a client registered without one may not
//! subscribe at all. On top of that, whoever allowed it, an origin is https, or plain http
//! only on this machine (a clinical system's listener beside the node), and never carries
//! credentials in its URL.
//!
//! Origins are compared in one canonical form, `scheme://host[:port]`: scheme and host in
//! lower case, the scheme's default port left out.

/// Longest URL or origin read.
pub const MAX_URL_CHARS: usize = 2_048;

/// Why a URL is not one the node posts notifications to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginRefused {
    #[error("`{0}` is not a URL such as https://ward.example.nhs.uk/notify")]
    NotUrl(String),
    #[error(
        "the URL carries credentials (user@host): give them in the subscription's channel.header instead"
    )]
    Credentials,
    #[error("the URL's scheme must be https (or http to this machine only)")]
    Scheme,
    #[error(
        "plain http is only for this machine (127.0.0.1, [::1] or localhost): notifications carry patient data, so use https"
    )]
    PlainHttpElsewhere,
    #[error(
        "`{0}` has a path or query: give the origin only, such as https://ward.example.nhs.uk:8443"
    )]
    NotOrigin(String),
}

fn shown(text: &str) -> String {
    text.chars().take(120).collect()
}

/// The canonical origin of `url`, which may have any path: where a subscription's endpoint is.
pub fn origin_of(url: &str) -> Result<String, OriginRefused> {
    if url.len() > MAX_URL_CHARS || url.chars().any(char::is_control) {
        return Err(OriginRefused::NotUrl(shown(url)));
    }
    let uri: axum::http::Uri = url.parse().map_err(|_| OriginRefused::NotUrl(shown(url)))?;
    let authority = uri
        .authority()
        .ok_or_else(|| OriginRefused::NotUrl(shown(url)))?;
    if authority.as_str().contains('@') {
        return Err(OriginRefused::Credentials);
    }
    let host = authority.host().to_ascii_lowercase();
    if host.is_empty() {
        return Err(OriginRefused::NotUrl(shown(url)));
    }
    let (scheme, default_port) = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
        Some("https") => ("https", 443),
        Some("http") if is_loopback(&host) => ("http", 80),
        Some("http") => return Err(OriginRefused::PlainHttpElsewhere),
        _ => return Err(OriginRefused::Scheme),
    };
    Ok(match authority.port_u16() {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// An origin as an operator allows it: [`origin_of`], and nothing after the port but an
/// optional `/`, so that what is allowed is plainly a whole origin.
pub fn allowed_origin(text: &str) -> Result<String, OriginRefused> {
    let origin = origin_of(text)?;
    let uri: axum::http::Uri = text
        .parse()
        .map_err(|_| OriginRefused::NotUrl(shown(text)))?;
    let bare = uri
        .path_and_query()
        .is_none_or(|rest| rest.as_str().is_empty() || rest.as_str() == "/");
    if !bare {
        return Err(OriginRefused::NotOrigin(shown(text)));
    }
    Ok(origin)
}

/// Whether `endpoint` is at one of `allowed` (origins as stored; each is put in canonical
/// form, so one stored before that form was enforced still compares).
pub fn endpoint_allowed(endpoint: &str, allowed: &[String]) -> Result<bool, OriginRefused> {
    let origin = origin_of(endpoint)?;
    Ok(allowed
        .iter()
        .any(|allowed| origin_of(allowed).is_ok_and(|allowed| allowed == origin)))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_compared_in_one_form() {
        for (url, origin) in [
            (
                "https://Ward.Example.NHS.uk/notify?x=1",
                "https://ward.example.nhs.uk",
            ),
            (
                "HTTPS://ward.example.nhs.uk:443/a",
                "https://ward.example.nhs.uk",
            ),
            (
                "https://ward.example.nhs.uk:8443/a",
                "https://ward.example.nhs.uk:8443",
            ),
            ("http://127.0.0.1:9999/hook", "http://127.0.0.1:9999"),
            ("http://localhost:80/hook", "http://localhost"),
            ("http://[::1]:9999/", "http://[::1]:9999"),
        ] {
            assert_eq!(origin_of(url).as_deref(), Ok(origin), "{url}");
        }
    }

    #[test]
    fn refused_urls_say_why() {
        for (url, refused) in [
            ("not a url", OriginRefused::NotUrl("not a url".into())),
            (
                "/relative/path",
                OriginRefused::NotUrl("/relative/path".into()),
            ),
            (
                "https://user:secret@ward.example.nhs.uk/",
                OriginRefused::Credentials,
            ),
            ("ftp://ward.example.nhs.uk/", OriginRefused::Scheme),
            (
                "http://ward.example.nhs.uk/",
                OriginRefused::PlainHttpElsewhere,
            ),
            ("http://10.0.0.1:9999/", OriginRefused::PlainHttpElsewhere),
            (
                "http://127.0.0.1.example.org/",
                OriginRefused::PlainHttpElsewhere,
            ),
        ] {
            assert_eq!(origin_of(url), Err(refused), "{url}");
        }
        let long = format!("https://ward.example.nhs.uk/{}", "a".repeat(MAX_URL_CHARS));
        assert!(matches!(origin_of(&long), Err(OriginRefused::NotUrl(_))));
    }

    #[test]
    fn an_allowed_origin_is_a_whole_origin() {
        assert_eq!(
            allowed_origin("https://ward.example.nhs.uk/").as_deref(),
            Ok("https://ward.example.nhs.uk")
        );
        assert_eq!(
            allowed_origin("http://127.0.0.1:9999").as_deref(),
            Ok("http://127.0.0.1:9999")
        );
        assert!(matches!(
            allowed_origin("https://ward.example.nhs.uk/notify"),
            Err(OriginRefused::NotOrigin(_))
        ));
        assert!(matches!(
            allowed_origin("https://ward.example.nhs.uk?a=1"),
            Err(OriginRefused::NotOrigin(_))
        ));
    }

    #[test]
    fn an_endpoint_is_allowed_only_at_an_allowed_origin() {
        let allowed = vec![
            "https://ward.example.nhs.uk".to_string(),
            // As a migration may have stored it: not yet in canonical form.
            "HTTP://127.0.0.1:9999".to_string(),
        ];
        for (endpoint, expected) in [
            ("https://ward.example.nhs.uk/notify", true),
            ("https://ward.example.nhs.uk:443/other", true),
            ("http://127.0.0.1:9999/hook", true),
            ("https://ward.example.nhs.uk:8443/notify", false),
            ("https://evil.example.org/notify", false),
            ("http://127.0.0.1:9998/hook", false),
            ("https://ward.example.nhs.uk.evil.example.org/", false),
        ] {
            assert_eq!(
                endpoint_allowed(endpoint, &allowed),
                Ok(expected),
                "{endpoint}"
            );
        }
        assert_eq!(
            endpoint_allowed("https://ward.example.nhs.uk/", &[]),
            Ok(false),
            "a client allowed no origin is notified nowhere"
        );
    }
}
