//! DNS-name endpoints in the run loops: the resolver, its first answers before the first
//! programming, and draining addresses that no flow uses any more.

use std::sync::Arc;
use std::time::Duration;

use extproxy::{
    dns::{self, Dns, Failure, Hickory, Lookup, Outcome, Wanted},
    gc::GcReport,
    metrics::Telemetry,
    translate::IpFamily,
};

use crate::cli::RunArgs;

/// How long the first programming waits for the names' first answers: without them, a restart
/// would take the addresses the adopted maps serve away from their Services. A resolver that
/// does not answer within this is served around (the names get their endpoints when it does).
pub const FIRST_ANSWERS_BOUND: Duration = Duration::from_secs(10);

/// The resolver the flags ask for. One that cannot be built (no /etc/resolv.conf) does not stop
/// the agent: every lookup fails and says so, the other Services are served.
pub fn resolver(args: &RunArgs, telemetry: &Arc<Telemetry>) -> Dns {
    let lookup: Arc<dyn Lookup> = match Hickory::new(&args.dns.dns_servers) {
        Ok(h) => Arc::new(h),
        Err(err) => {
            tracing::warn!("DNS-name endpoints cannot be looked up: {err}");
            Arc::new(Broken(err.to_string()))
        }
    };
    Dns::new(
        args.dns.timing(),
        lookup,
        Some(telemetry.clone()),
        Some(args.datapath.state_dir.clone()),
    )
}

/// Starts looking `wanted` up and, at start (`first`), waits (bounded) for the first answers.
pub async fn want(dns: &mut Dns, wanted: &Wanted, first: bool) {
    dns.want(wanted);
    if !first || dns.is_empty() {
        return;
    }
    tracing::info!(
        "FQDN endpoints: {}, resolver {}",
        dns::describe_wanted(wanted),
        dns.servers()
    );
    if !dns.settle(FIRST_ANSWERS_BOUND).await {
        tracing::warn!(
            "FQDN endpoints: not every name answered within {} s; programming without them \
             (they get their endpoints when they answer)",
            FIRST_ANSWERS_BOUND.as_secs()
        );
    }
}

/// After a conntrack sweep: draining addresses without a flow go before their bound. Returns
/// the new answers when that changed anything.
pub fn after_sweep(dns: &mut Dns, report: Option<&GcReport>) -> Option<Arc<dns::Resolved>> {
    let report = report?;
    dns.forget_idle_drained(|addr| report.busy_endpoints.contains(addr))
}

/// A resolver that could not be built.
struct Broken(String);

impl Lookup for Broken {
    fn lookup(&self, _: Arc<str>, _: IpFamily) -> dns::lookup::LookupFuture {
        Box::pin(async { Outcome::Failed(Failure::Other) })
    }

    fn describe(&self) -> String {
        format!("none ({})", self.0)
    }
}
