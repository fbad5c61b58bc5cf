//! The `extproxy.io/health-check*` annotations of a Service: what to check, how often, and what
//! to do when every endpoint is down. Parsed by the translator (a pure function of the Service);
//! which setting is in force when a value is bad is the monitor's business (the previous one).

use std::time::Duration;

use crate::names::{
    HEALTH_CHECK_ALL_DOWN_ANNOTATION, HEALTH_CHECK_ANNOTATION, HEALTH_CHECK_HEALTHY_ANNOTATION,
    HEALTH_CHECK_HOST_ANNOTATION, HEALTH_CHECK_INTERVAL_ANNOTATION,
    HEALTH_CHECK_PASSIVE_ANNOTATION, HEALTH_CHECK_PATH_ANNOTATION, HEALTH_CHECK_PORT_ANNOTATION,
    HEALTH_CHECK_TIMEOUT_ANNOTATION, HEALTH_CHECK_UNHEALTHY_ANNOTATION,
    HEALTH_CHECK_VERIFY_ANNOTATION,
};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_UNHEALTHY_THRESHOLD: u32 = 3;
pub const DEFAULT_HEALTHY_THRESHOLD: u32 = 2;
/// Shorter intervals are refused: with every node probing, 100 ms is already 10 probes/s per
/// node and endpoint.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_THRESHOLD: u32 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CheckKind {
    Tcp,
    Http,
    Https,
}

impl CheckKind {
    pub fn name(self) -> &'static str {
        match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Http => "http",
            CheckKind::Https => "https",
        }
    }
}

/// An active check: probes sent to every endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActiveCheck {
    pub kind: CheckKind,
    /// http(s): the request path.
    pub path: String,
    /// https: SNI and Host; http: Host. None: the endpoint's address.
    pub host: Option<String>,
    /// None: the endpoint's own port.
    pub port: Option<u16>,
    /// https: verify the certificate (against the system's roots, for `host`).
    pub verify: bool,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

/// What to do when every endpoint of a Service port is unhealthy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AllDown {
    /// Use them all, as if none had been checked: a check that is wrong (or an outage of the
    /// path the probes take) must not take a working Service down.
    #[default]
    FailOpen,
    /// Refuse new connections (TCP RST, ICMP unreachable), so clients fail fast.
    Refuse,
}

/// A Service's health checking.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HealthConfig {
    pub active: Option<ActiveCheck>,
    /// Outlier detection from what new flows saw in the data path (on unless annotated off).
    pub passive: bool,
    pub all_down: AllDown,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            active: None,
            passive: true,
            all_down: AllDown::FailOpen,
        }
    }
}

/// One bad annotation: its name and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnnotationError {
    pub annotation: &'static str,
    pub message: String,
}

/// Parses the health annotations (`get` looks one up). Every bad value is reported; with any,
/// the result is an error (the Service keeps its previous setting).
pub fn parse<'a>(
    get: impl Fn(&str) -> Option<&'a str>,
) -> Result<HealthConfig, Vec<AnnotationError>> {
    let mut errors = Vec::new();
    let mut error = |annotation: &'static str, message: String| {
        errors.push(AnnotationError {
            annotation,
            message,
        })
    };
    let text = |name: &str| get(name).map(str::trim);

    let kind = match text(HEALTH_CHECK_ANNOTATION) {
        None | Some("none") | Some("") => None,
        Some("tcp") => Some(CheckKind::Tcp),
        Some("http") => Some(CheckKind::Http),
        Some("https") => Some(CheckKind::Https),
        Some(other) => {
            error(
                HEALTH_CHECK_ANNOTATION,
                format!("{other:?} is not a check: use tcp, http, https or none"),
            );
            None
        }
    };
    let duration =
        |name: &'static str, default: Duration, error: &mut dyn FnMut(&'static str, String)| {
            match text(name) {
                None => default,
                Some(t) => match parse_duration(t) {
                    Some(d) => d,
                    None => {
                        error(
                            name,
                            format!("{t:?} is not a duration (like 500ms, 2s, 1m)"),
                        );
                        default
                    }
                },
            }
        };
    let interval = duration(
        HEALTH_CHECK_INTERVAL_ANNOTATION,
        DEFAULT_INTERVAL,
        &mut error,
    );
    let timeout = duration(HEALTH_CHECK_TIMEOUT_ANNOTATION, DEFAULT_TIMEOUT, &mut error);
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
        error(
            HEALTH_CHECK_INTERVAL_ANNOTATION,
            format!(
                "{} is out of range {}-{}",
                show(interval),
                show(MIN_INTERVAL),
                show(MAX_INTERVAL)
            ),
        );
    }
    if timeout.is_zero() || timeout > interval {
        error(
            HEALTH_CHECK_TIMEOUT_ANNOTATION,
            format!(
                "{} must be more than 0 and at most the interval ({})",
                show(timeout),
                show(interval)
            ),
        );
    }
    let threshold =
        |name: &'static str, default: u32, error: &mut dyn FnMut(&'static str, String)| match text(
            name,
        ) {
            None => default,
            Some(t) => match t.parse::<u32>() {
                Ok(n) if (1..=MAX_THRESHOLD).contains(&n) => n,
                _ => {
                    error(
                        name,
                        format!("{t:?} is not a count from 1 to {MAX_THRESHOLD}"),
                    );
                    default
                }
            },
        };
    let unhealthy_threshold = threshold(
        HEALTH_CHECK_UNHEALTHY_ANNOTATION,
        DEFAULT_UNHEALTHY_THRESHOLD,
        &mut error,
    );
    let healthy_threshold = threshold(
        HEALTH_CHECK_HEALTHY_ANNOTATION,
        DEFAULT_HEALTHY_THRESHOLD,
        &mut error,
    );
    let port = match text(HEALTH_CHECK_PORT_ANNOTATION) {
        None => None,
        Some(t) => match t.parse::<u16>() {
            Ok(n) if n != 0 => Some(n),
            _ => {
                error(
                    HEALTH_CHECK_PORT_ANNOTATION,
                    format!("{t:?} is not a port number (1-65535)"),
                );
                None
            }
        },
    };
    let path = match text(HEALTH_CHECK_PATH_ANNOTATION) {
        None => "/".to_owned(),
        Some(p)
            if p.starts_with('/') && !p.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            p.to_owned()
        }
        Some(p) => {
            error(
                HEALTH_CHECK_PATH_ANNOTATION,
                format!("{p:?} is not a request path (it starts with / and has no spaces)"),
            );
            "/".to_owned()
        }
    };
    let host = match text(HEALTH_CHECK_HOST_ANNOTATION) {
        None => None,
        Some(h) if valid_host(h) => Some(h.to_owned()),
        Some(h) => {
            error(
                HEALTH_CHECK_HOST_ANNOTATION,
                format!("{h:?} is not a host name"),
            );
            None
        }
    };
    let boolean = |name: &'static str,
                   default: bool,
                   error: &mut dyn FnMut(&'static str, String)| {
        match text(name) {
            None => default,
            Some("true") => true,
            Some("false") => false,
            Some(t) => {
                error(name, format!("{t:?} is neither \"true\" nor \"false\""));
                default
            }
        }
    };
    let verify = boolean(HEALTH_CHECK_VERIFY_ANNOTATION, false, &mut error);
    let passive = boolean(HEALTH_CHECK_PASSIVE_ANNOTATION, true, &mut error);
    let all_down = match text(HEALTH_CHECK_ALL_DOWN_ANNOTATION) {
        None | Some("fail-open") => AllDown::FailOpen,
        Some("refuse") => AllDown::Refuse,
        Some(other) => {
            error(
                HEALTH_CHECK_ALL_DOWN_ANNOTATION,
                format!("{other:?} is not a policy: use fail-open or refuse"),
            );
            AllDown::FailOpen
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(HealthConfig {
        active: kind.map(|kind| ActiveCheck {
            kind,
            path,
            host,
            port,
            verify,
            interval,
            timeout,
            unhealthy_threshold,
            healthy_threshold,
        }),
        passive,
        all_down,
    })
}

/// A DNS name or an IP address (what SNI and Host can carry).
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && (h.parse::<std::net::IpAddr>().is_ok()
            || h.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            }))
}

/// A duration as Kubernetes (Go's time.ParseDuration) writes it: `500ms`, `2s`, `1m30s`,
/// `1.5s`, `1h`. Units ns, us (µs), ms, s, m, h; no sign.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

/// A duration the way the annotations write it.
pub fn show(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn parse_map(pairs: &[(&str, &str)]) -> Result<HealthConfig, Vec<AnnotationError>> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(|k| map.get(k).map(String::as_str))
    }

    #[test]
    fn durations_are_read_as_kubernetes_writes_them() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(parse_duration("500ms"), ms(500));
        assert_eq!(parse_duration("2s"), ms(2000));
        assert_eq!(parse_duration("1m"), ms(60_000));
        assert_eq!(parse_duration("1m30s"), ms(90_000));
        assert_eq!(parse_duration("1.5s"), ms(1500));
        assert_eq!(parse_duration("1h"), ms(3_600_000));
        assert_eq!(parse_duration("0"), ms(0));
        for bad in ["", "5", "s", "5x", "-1s", "1s5", "1..5s", "ms"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(show(Duration::from_millis(500)), "500ms");
        assert_eq!(show(Duration::from_secs(2)), "2s");
        assert_eq!(show(Duration::from_secs(120)), "2m");
    }

    #[test]
    fn no_annotation_is_passive_only_and_fails_open() {
        let config = parse_map(&[]).unwrap();
        assert_eq!(config, HealthConfig::default());
        assert!(config.passive);
        assert_eq!(config.active, None);
        assert_eq!(
            parse_map(&[(HEALTH_CHECK_ANNOTATION, "none")]).unwrap(),
            config
        );
    }

    #[test]
    fn a_full_http_check_and_the_defaults() {
        let config = parse_map(&[
            (HEALTH_CHECK_ANNOTATION, "https"),
            (HEALTH_CHECK_PATH_ANNOTATION, "/healthz"),
            (HEALTH_CHECK_HOST_ANNOTATION, "api.example.com"),
            (HEALTH_CHECK_PORT_ANNOTATION, "8443"),
            (HEALTH_CHECK_INTERVAL_ANNOTATION, "1s"),
            (HEALTH_CHECK_TIMEOUT_ANNOTATION, "500ms"),
            (HEALTH_CHECK_UNHEALTHY_ANNOTATION, "2"),
            (HEALTH_CHECK_HEALTHY_ANNOTATION, "2"),
            (HEALTH_CHECK_VERIFY_ANNOTATION, "true"),
            (HEALTH_CHECK_ALL_DOWN_ANNOTATION, "refuse"),
        ])
        .unwrap();
        assert_eq!(
            config.active,
            Some(ActiveCheck {
                kind: CheckKind::Https,
                path: "/healthz".into(),
                host: Some("api.example.com".into()),
                port: Some(8443),
                verify: true,
                interval: Duration::from_secs(1),
                timeout: Duration::from_millis(500),
                unhealthy_threshold: 2,
                healthy_threshold: 2,
            })
        );
        assert_eq!(config.all_down, AllDown::Refuse);
        let tcp = parse_map(&[(HEALTH_CHECK_ANNOTATION, "tcp")]).unwrap();
        let active = tcp.active.unwrap();
        assert_eq!(
            (
                active.interval,
                active.timeout,
                active.unhealthy_threshold,
                active.healthy_threshold,
                active.path.as_str(),
                active.verify
            ),
            (DEFAULT_INTERVAL, DEFAULT_TIMEOUT, 3, 2, "/", false)
        );
    }

    #[test]
    fn every_bad_value_is_an_error_naming_its_annotation() {
        let errors = parse_map(&[
            (HEALTH_CHECK_ANNOTATION, "grpc"),
            (HEALTH_CHECK_INTERVAL_ANNOTATION, "5"),
            (HEALTH_CHECK_UNHEALTHY_ANNOTATION, "0"),
            (HEALTH_CHECK_HEALTHY_ANNOTATION, "three"),
            (HEALTH_CHECK_PORT_ANNOTATION, "70000"),
            (HEALTH_CHECK_PATH_ANNOTATION, "healthz"),
            (HEALTH_CHECK_VERIFY_ANNOTATION, "yes"),
            (HEALTH_CHECK_ALL_DOWN_ANNOTATION, "panic"),
            (HEALTH_CHECK_HOST_ANNOTATION, "a b"),
        ])
        .unwrap_err();
        let named: Vec<&str> = errors.iter().map(|e| e.annotation).collect();
        assert_eq!(
            named,
            [
                HEALTH_CHECK_ANNOTATION,
                HEALTH_CHECK_INTERVAL_ANNOTATION,
                HEALTH_CHECK_UNHEALTHY_ANNOTATION,
                HEALTH_CHECK_HEALTHY_ANNOTATION,
                HEALTH_CHECK_PORT_ANNOTATION,
                HEALTH_CHECK_PATH_ANNOTATION,
                HEALTH_CHECK_HOST_ANNOTATION,
                HEALTH_CHECK_VERIFY_ANNOTATION,
                HEALTH_CHECK_ALL_DOWN_ANNOTATION,
            ]
        );
        assert!(
            errors[1].message.contains("\"5\" is not a duration"),
            "{errors:?}"
        );
        // The timeout must fit in the interval.
        let errors = parse_map(&[
            (HEALTH_CHECK_ANNOTATION, "tcp"),
            (HEALTH_CHECK_INTERVAL_ANNOTATION, "1s"),
            (HEALTH_CHECK_TIMEOUT_ANNOTATION, "2s"),
        ])
        .unwrap_err();
        assert_eq!(errors[0].annotation, HEALTH_CHECK_TIMEOUT_ANNOTATION);
        let errors = parse_map(&[(HEALTH_CHECK_INTERVAL_ANNOTATION, "10ms")]).unwrap_err();
        assert_eq!(errors[0].annotation, HEALTH_CHECK_INTERVAL_ANNOTATION);
    }
}
