//! `policy-agent`: the Palisade node agent (`run`) and a small client for
//! its API (`status`, `wait`, `endpoints register|unregister|list`,
//! `explain`, which also works offline on a directory of manifests).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use policy_agent::agent::{self, AgentConfig, SourceConfig};
use policy_agent::api::client::Client;
use policy_agent::api::{DEFAULT_SOCKET, explain_query, explain_response, proto};

#[derive(Parser, Debug)]
#[command(
    name = "policy-agent",
    version,
    about = "Palisade node agent: enforces Kubernetes NetworkPolicy with eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent (as root): watch the cluster, program the classifier,
    /// serve the API.
    Run(RunArgs),
    /// Show what the running agent enforces and what it found.
    Status(StatusArgs),
    /// Wait until a revision is enforced (for the node or one endpoint).
    Wait(WaitArgs),
    /// Register, unregister or list endpoints (what the CNI plugin does).
    #[command(subcommand)]
    Endpoints(EndpointsCommand),
    /// Print flow verdicts as the classifier makes them: which policy
    /// allowed or dropped each connection.
    Observe(ObserveArgs),
    /// Say whether a connection is allowed and why: which policies select
    /// each end, and how each of their rules fares. Asks the running agent,
    /// or, with --dir, reads a directory of manifests as `run --source
    /// files` does. Exit status: 0 allowed, 1 denied, 2 error.
    Explain(ExplainArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    /// For a person: one line per flow (observe), the explanation (explain).
    Text,
    /// The API's messages as JSON (observe: one Flow object per line).
    Json,
}

/// Where the agent is: its unix socket, or its TLS listener.
#[derive(Args, Debug)]
struct ServerArgs {
    /// The agent's API socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Instead of --socket: the agent's TLS listener (`run
    /// --flows-listen`), as https://HOST:PORT. Needs --tls-ca.
    #[arg(long, value_name = "URL", requires = "tls_ca")]
    server: Option<String>,
    /// With --server: the CA that signed the agent's certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "server")]
    tls_ca: Option<PathBuf>,
    /// With --server: this client's certificate (PEM), when the agent
    /// requires one (--tls-client-ca).
    #[arg(long, value_name = "FILE", requires_all = ["server", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// With --server: this client's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["server", "tls_cert"])]
    tls_key: Option<PathBuf>,
}

impl ServerArgs {
    fn connect(&self) -> Result<Client> {
        let Some(server) = &self.server else {
            return Ok(Client::connect(&self.socket)?);
        };
        let ca = self.tls_ca.as_deref().context("--server needs --tls-ca")?;
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        let tls = policy_agent::api::tls::client_config(ca, identity)?;
        Ok(Client::connect_tls(server, tls)?)
    }
}

#[derive(Args, Debug)]
struct ObserveArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Keep printing new flows as they come (until Ctrl-C).
    #[arg(short, long)]
    follow: bool,
    /// Start with the last N flows of the agent's history (default: 20
    /// without --follow, 0 with it).
    #[arg(long, value_name = "N")]
    last: Option<u32>,
    /// Stop after SECS seconds.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Either end in this namespace (repeat for several).
    #[arg(short, long = "namespace", value_name = "NS")]
    namespaces: Vec<String>,
    /// Either end is this pod: NAME or NS/NAME (repeat for several).
    #[arg(long = "pod", value_name = "POD")]
    pods: Vec<String>,
    /// Either end is a pod whose labels match (kubectl syntax, e.g.
    /// `app=web,tier!=db`).
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    selector: Option<String>,
    /// Only allowed or only denied flows.
    #[arg(long, value_parser = ["allowed", "denied"])]
    verdict: Option<String>,
    /// Only flows judged at the pod's ingress or egress.
    #[arg(long, value_parser = ["ingress", "egress"])]
    direction: Option<String>,
    /// TCP, UDP, SCTP, ICMP, ICMPv6 (repeat for several).
    #[arg(long = "protocol", value_name = "PROTO")]
    protocols: Vec<String>,
    /// Either end's port (repeat for several).
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u32>,
    /// Decided by, or isolating with, this policy: NAME or NS/NAME.
    #[arg(long = "policy", value_name = "POLICY")]
    policies: Vec<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum SourceKind {
    /// Watch the Kubernetes API (in-cluster config or kubeconfig).
    Kube,
    /// Read Kubernetes manifests from a directory (--dir).
    Files,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// This node's name (pods' spec.nodeName). Default: $NODE_NAME, else
    /// the host name.
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// Where the cluster comes from.
    #[arg(long, value_enum, default_value_t = SourceKind::Kube)]
    source: SourceKind,
    /// The manifest directory of the files source.
    #[arg(long, required_if_eq("source", "files"))]
    dir: Option<PathBuf>,
    /// This node's addresses (files source; repeat for several): peers with
    /// them are the node.
    #[arg(long = "node-ip", value_name = "IP")]
    node_ips: Vec<IpAddr>,
    /// Where the maps and links are pinned (bpffs).
    #[arg(long, default_value = policy_common::PIN_DIR)]
    pin_dir: PathBuf,
    /// Where identities and endpoints are saved across restarts.
    #[arg(long, default_value = "/var/lib/palisade")]
    state_dir: PathBuf,
    /// The API's unix socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Flows kept in memory for `observe --last` (0: none).
    #[arg(long, value_name = "N", default_value_t = agent::DEFAULT_FLOW_HISTORY)]
    flow_history: usize,
    /// Serve the metrics for Prometheus at http://ADDR/metrics (e.g.
    /// 127.0.0.1:9963 or [::]:9963; port 0 picks a free one). Off by
    /// default: without it no TCP socket is opened.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Also serve the read-only API (Flows, Explain, Status; never
    /// Endpoints nor Sync) on TCP ADDR with TLS, for `observe --server`.
    /// Off by default: without it no TCP socket is opened. Needs --tls-cert
    /// and --tls-key; --tls-client-ca is recommended.
    #[arg(long, value_name = "ADDR", requires_all = ["tls_cert", "tls_key"])]
    flows_listen: Option<SocketAddr>,
    /// With --flows-listen: the server's certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "flows_listen")]
    tls_cert: Option<PathBuf>,
    /// With --flows-listen: the server's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "flows_listen")]
    tls_key: Option<PathBuf>,
    /// With --flows-listen: require clients to present a certificate signed
    /// by this CA (PEM), i.e. mutual TLS. Without it any client that can
    /// reach ADDR may read flows.
    #[arg(long, value_name = "FILE", requires = "flows_listen")]
    tls_client_ca: Option<PathBuf>,
    /// Log lines as text or JSON (level: RUST_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    /// Who opens the connection: a pod ("namespace/name"), "node" (the
    /// node of the other end), or an IP address.
    #[arg(long, value_name = "PARTY")]
    from: String,
    /// Who it goes to (same forms as --from).
    #[arg(long, value_name = "PARTY")]
    to: String,
    /// The destination port.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    protocol: String,
    /// The agent (not with --dir).
    #[command(flatten)]
    server: ServerArgs,
    /// Explain offline: read the cluster from this directory of manifests
    /// (as `run --source files --dir` does) instead of asking the agent.
    #[arg(long, conflicts_with_all = ["socket", "server"])]
    dir: Option<PathBuf>,
    /// With --dir: the node's addresses (repeat for several); peers with
    /// them are the node.
    #[arg(long = "node-ip", value_name = "IP", requires = "dir")]
    node_ips: Vec<IpAddr>,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

/// Exit status of `explain` for an error (0 allowed, 1 denied).
const EXPLAIN_ERROR: u8 = 2;

#[derive(Args, Debug)]
struct SocketArg {
    /// The agent's API socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Print the whole status as JSON.
    #[arg(long)]
    json: bool,
    /// Also print the metrics.
    #[arg(long)]
    metrics: bool,
}

#[derive(Args, Debug)]
struct WaitArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// Wait for this endpoint only (default: the whole node).
    #[arg(long)]
    container_id: Option<String>,
    /// The revision to wait for (default: the current one).
    #[arg(long, default_value_t = 0)]
    revision: u64,
    /// Have the source re-read its input first (files: re-scan now) and
    /// wait for the revision that includes it.
    #[arg(long, conflicts_with = "revision")]
    sync: bool,
    /// Give up after SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    timeout: f64,
}

#[derive(Subcommand, Debug)]
enum EndpointsCommand {
    /// Attach the classifier to a pod's host-side interface and program it.
    Register(RegisterArgs),
    /// Detach and forget an endpoint.
    Unregister {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        container_id: String,
    },
    /// List the registered endpoints.
    List {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct RegisterArgs {
    #[command(flatten)]
    socket: SocketArg,
    #[arg(long)]
    namespace: String,
    #[arg(long)]
    pod: String,
    #[arg(long)]
    container_id: String,
    /// The pod's network namespace (for the record).
    #[arg(long, default_value = "")]
    netns: String,
    /// The host side of the pod's veth.
    #[arg(long)]
    interface: String,
    /// The pod's addresses (repeat for several).
    #[arg(long = "ip", value_name = "IP")]
    ips: Vec<String>,
    /// Wait until the endpoint is programmed.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after SECS seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    timeout: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Explain(args) = &cli.command {
        return match explain(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("policy-agent: {e:#}");
                ExitCode::from(EXPLAIN_ERROR)
            }
        };
    }
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Status(args) => status(&args),
        Command::Wait(args) => wait(&args),
        Command::Endpoints(command) => endpoints(command),
        Command::Observe(args) => observe(&args),
        Command::Explain(_) => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("policy-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(args: RunArgs) -> Result<()> {
    init_logging(args.log_format);
    let node_name = match args.node {
        Some(n) if !n.is_empty() => n,
        _ => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name (or pass --node)")?
            .trim()
            .to_owned(),
    };
    let source = match args.source {
        SourceKind::Files => SourceConfig::Files {
            dir: args.dir.context("--source files needs --dir")?,
            node_ips: args.node_ips,
        },
        SourceKind::Kube => {
            if !args.node_ips.is_empty() {
                tracing::warn!(
                    "--node-ip is ignored with --source kube: the Node object's addresses are used"
                );
            }
            SourceConfig::Kube
        }
    };
    // Read and checked before anything else starts: a bad file is one
    // clear error, not a failing handshake later.
    let flows_listen = match (args.flows_listen, &args.tls_cert, &args.tls_key) {
        (Some(addr), Some(cert), Some(key)) => Some(agent::FlowsListen {
            addr,
            tls: policy_agent::api::tls::server_config(cert, key, args.tls_client_ca.as_deref())?,
            client_auth: args.tls_client_ca.is_some(),
        }),
        (Some(_), _, _) => anyhow::bail!("--flows-listen needs --tls-cert and --tls-key"),
        (None, _, _) => None,
    };
    let config = AgentConfig {
        node_name,
        source,
        pin_dir: args.pin_dir,
        state_dir: args.state_dir,
        socket: args.socket,
        flow_history: args.flow_history,
        metrics_listen: args.metrics_listen,
        flows_listen,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(agent::run(config));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "agent stopped");
    }
    result
}

fn observe(args: &ObserveArgs) -> Result<()> {
    use std::io::Write as _;

    let request = proto::ObserveRequest {
        last: args.last.unwrap_or(if args.follow { 0 } else { 20 }),
        follow: args.follow,
        filter: Some(proto::FlowFilter {
            namespace: args.namespaces.clone(),
            pod: args.pods.clone(),
            label_selector: args.selector.clone().unwrap_or_default(),
            verdict: args.verdict.clone().unwrap_or_default(),
            direction: args.direction.clone().unwrap_or_default(),
            protocol: args.protocols.clone(),
            port: args.ports.clone(),
            policy: args.policies.clone(),
        }),
    };
    let limit = args
        .duration
        .map(|s| Duration::try_from_secs_f64(s).context("invalid --duration"))
        .transpose()?;
    let mut client = args.server.connect()?;
    let mut stdout = std::io::stdout().lock();
    if args.output == OutputFormat::Text {
        writeln!(stdout, "{}", policy_agent::observe::header())?;
    }
    let mut write_error = None;
    client.observe(request, limit, |item| {
        let text = match (&item.item, args.output) {
            (Some(proto::observe_response::Item::Flow(flow)), OutputFormat::Text) => {
                policy_agent::observe::line(flow)
            }
            (Some(proto::observe_response::Item::Lost(lost)), OutputFormat::Text) => {
                policy_agent::observe::lost_line(lost)
            }
            (Some(proto::observe_response::Item::Flow(flow)), OutputFormat::Json) => {
                serde_json::to_string(flow).unwrap_or_default()
            }
            (Some(proto::observe_response::Item::Lost(lost)), OutputFormat::Json) => {
                serde_json::json!({ "lost": lost }).to_string()
            }
            (None, _) => return true,
        };
        // A closed pipe (`| head`) ends the stream quietly.
        match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
            Ok(()) => true,
            Err(e) => {
                write_error = Some(e);
                false
            }
        }
    })?;
    match write_error {
        Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn secs(s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).context("invalid --timeout")
}

fn status(args: &StatusArgs) -> Result<()> {
    let status = Client::connect(&args.socket.socket)?.status()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!(
        "node {}  source {}  ready {}  revision {}  enforced {}  up {}s",
        status.node_name,
        status.source,
        if status.ready { "yes" } else { "no" },
        status.revision,
        status.enforced_revision,
        status.uptime_seconds
    );
    if !status.waiting_for.is_empty() {
        println!("waiting for: {}", status.waiting_for.join(", "));
    }
    if !status.last_error.is_empty() {
        println!(
            "LAST ERROR (revision {}): {}",
            status.failed_revision, status.last_error
        );
    }
    print_endpoints(&status.endpoints);
    if let Some(d) = &status.diagnostics {
        println!(
            "diagnostics: {} errors, {} warnings, {} info",
            d.errors, d.warnings, d.infos
        );
        for item in &d.items {
            let object = match (item.namespace.as_str(), item.rule.as_str()) {
                ("", "") => item.name.clone(),
                ("", rule) => format!("{} {rule}", item.name),
                (ns, "") => format!("{ns}/{}", item.name),
                (ns, rule) => format!("{ns}/{} {rule}", item.name),
            };
            println!(
                "  {:<7} {} {object}: {} ({})",
                item.severity, item.object_kind, item.message, item.code
            );
        }
    }
    if args.metrics {
        println!("metrics:");
        for m in &status.metrics {
            if m.labels.is_empty() {
                println!("  {} {}", m.name, m.value);
            } else {
                println!("  {}{{{}}} {}", m.name, m.labels, m.value);
            }
        }
    }
    Ok(())
}

fn print_endpoints(endpoints: &[proto::Endpoint]) {
    println!("endpoints: {}", endpoints.len());
    if endpoints.is_empty() {
        return;
    }
    println!(
        "  {:<24} {:<32} {:<15} {:>7} {:>5} {:>8}  ISOLATED",
        "CONTAINER", "POD", "INTERFACE", "IFINDEX", "ID", "ENFORCED"
    );
    for e in endpoints {
        let isolated = match (e.pod_known, e.ingress_isolated, e.egress_isolated) {
            (false, _, _) => "both (pod unknown)",
            (true, true, true) => "ingress, egress",
            (true, true, false) => "ingress",
            (true, false, true) => "egress",
            (true, false, false) => "no",
        };
        let container: String = e.container_id.chars().take(24).collect();
        println!(
            "  {:<24} {:<32} {:<15} {:>7} {:>5} {:>8}  {isolated}",
            container,
            format!("{}/{}", e.namespace, e.pod_name),
            e.host_interface,
            e.ifindex,
            e.endpoint_id,
            e.enforced_revision
        );
    }
}

/// `policy-agent explain`: prints the explanation, returns whether the
/// connection is allowed.
fn explain(args: &ExplainArgs) -> Result<bool> {
    let request = proto::ExplainRequest {
        from: args.from.clone(),
        to: args.to.clone(),
        protocol: args.protocol.clone(),
        port: u32::from(args.port),
    };
    // The same checks as the agent's, before anything is read or sent.
    let query = explain_query(&request)?;
    let response = match &args.dir {
        Some(dir) => explain_offline(dir, &args.node_ips, &query)?,
        None => args.server.connect()?.explain(request)?,
    };
    match args.output {
        OutputFormat::Text => print!("{}", response.text),
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&response)?),
    }
    Ok(response.allowed)
}

/// Explains `query` against the manifests of `dir`, loaded with the files
/// source's loader and compiled with the agent's compiler. Problems with
/// the input are reported on stderr.
fn explain_offline(
    dir: &std::path::Path,
    node_ips: &[IpAddr],
    query: &policy_agent::explain::Query,
) -> Result<proto::ExplainResponse> {
    use policy_agent::model::{ClusterState, Severity};
    let loaded = policy_agent::source::files::load_dir(dir)?;
    for p in &loaded.problems {
        eprintln!(
            "{}: {}: {} ({})",
            p.severity.as_str(),
            p.path.display(),
            p.message,
            p.code
        );
    }
    let (state, rejected) =
        ClusterState::from_k8s(&loaded.namespaces, &loaded.pods, &loaded.policies);
    for d in rejected
        .iter()
        .chain(state.diagnostics())
        .filter(|d| d.severity != Severity::Info)
    {
        eprintln!("{d}");
    }
    let explanation = policy_agent::explain::explain(&state, node_ips, query)?;
    Ok(explain_response(&explanation, 0))
}

fn wait(args: &WaitArgs) -> Result<()> {
    let mut client = Client::connect(&args.socket.socket)?;
    let revision = if args.sync {
        client.sync()?
    } else {
        args.revision
    };
    let enforced =
        client.wait_enforced(args.container_id.as_deref(), revision, secs(args.timeout)?)?;
    println!("enforced revision {enforced}");
    Ok(())
}

fn endpoints(command: EndpointsCommand) -> Result<()> {
    match command {
        EndpointsCommand::Register(args) => {
            let mut client = Client::connect(&args.socket.socket)?;
            let done = client.register(proto::RegisterRequest {
                namespace: args.namespace,
                pod_name: args.pod,
                container_id: args.container_id.clone(),
                netns_path: args.netns,
                host_interface: args.interface,
                ips: args.ips,
            })?;
            let endpoint = done.endpoint.unwrap_or_default();
            println!(
                "registered {} as endpoint {} on ifindex {} (revision {})",
                args.container_id, endpoint.endpoint_id, endpoint.ifindex, done.revision
            );
            if args.wait {
                let enforced = client.wait_enforced(
                    Some(&args.container_id),
                    done.revision,
                    secs(args.timeout)?,
                )?;
                println!("enforced revision {enforced}");
            }
        }
        EndpointsCommand::Unregister {
            socket,
            container_id,
        } => {
            let done = Client::connect(&socket.socket)?.unregister(&container_id)?;
            if done.found {
                println!(
                    "unregistered {container_id} ({} tracked connections flushed, revision {})",
                    done.connections_flushed, done.revision
                );
            } else {
                println!("{container_id} was not registered");
            }
        }
        EndpointsCommand::List { socket, json } => {
            let list = Client::connect(&socket.socket)?.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_endpoints(&list);
            }
        }
    }
    Ok(())
}
