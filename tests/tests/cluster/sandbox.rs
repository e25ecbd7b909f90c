//! A hostile pipeline, run through a real cluster (dispatcher, runner,
//! submitted over the wire like `surveil submit`), goes after Surveil's
//! secrets and state: the token file, the runner's outbox and config file,
//! `/proc/<runner>/environ`, the dispatcher's database, another job's
//! checkout, the mirror. Each attempt must fail with the denial in the job
//! log, while a real build (cc, run, write to the checkout and /tmp) in the
//! same job passes, the environment holds none of the runner's secrets, and
//! `network = false` cuts a task off from a listener the test opened.
//!
//! Three isolations are told apart: the bubblewrap sandbox (the default),
//! the sandbox as a task user, and a task user alone (`--task-user` with
//! `--unsandboxed`, what a machine without user namespaces gets). Where
//! one cannot run here the story says so loudly, and fails under `CI=true`.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use surveil_proto::{JobStatus, TaskStatus};
use surveil_runner::sandbox::{self, Isolation};
use surveil_runner::workspace::Workspace;
use surveil_tests::cluster;
use surveil_tests::probe::{describe, status_of};

use crate::common::{POLL, STEP, Scene, bins};

const TOKEN: &str = "sandbox-story-token-5f1c0e";
/// Set in the runner's environment; none may reach a task.
const RUNNER_SECRETS: [(&str, &str); 3] = [
    ("SSH_AUTH_SOCK", "/tmp/ssh-agent-sock-3d9a/agent.77"),
    ("FOO_KEY", "foo-key-secret-value-81c2"),
    (
        "DATABASE_URL",
        "postgres://surveil:db-secret-a7e4@127.0.0.1/ci",
    ),
];
/// Only in the runner's config file.
const CONFIG_SECRET: &str = "config-secret-label-6b0d";
/// The unprivileged account the task-user stories run tasks as.
const TASK_USER: &str = "surveil-task";

/// How the runner of a story isolates its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// bwrap, as the runner's own (root) uid in a user namespace.
    Sandbox,
    /// bwrap, started as the task user.
    SandboxAsUser,
    /// `--task-user` without bwrap.
    TaskUser,
}

impl Mode {
    fn flags(self) -> Vec<&'static str> {
        match self {
            Mode::Sandbox => vec![],
            Mode::SandboxAsUser => vec!["--task-user", TASK_USER],
            Mode::TaskUser => vec!["--task-user", TASK_USER, "--unsandboxed"],
        }
    }

    /// What a task is told when it reaches for a file it must not have:
    /// in the sandbox the file is not there at all.
    fn denial(self) -> &'static str {
        match self {
            Mode::Sandbox | Mode::SandboxAsUser => "No such file or directory",
            Mode::TaskUser => "Permission denied",
        }
    }

    fn sandboxed(self) -> bool {
        self != Mode::TaskUser
    }
}

/// Says loudly why a story cannot run here; under `CI=true` that fails.
fn skip(story: &str, why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run `{story}`, but {why}"
    );
    eprintln!("SKIPPED `{story}`: {why}");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Creates [`TASK_USER`] if it is missing (the machine is CI's or a
/// developer's, and the test runs as root); bounded retries, since another
/// test binary may be creating it at the same moment.
fn ensure_task_user() {
    static CREATED: Mutex<bool> = Mutex::new(false);
    let mut done = CREATED.lock().unwrap_or_else(|p| p.into_inner());
    if *done {
        return;
    }
    for _ in 0..10 {
        if nix::unistd::User::from_name(TASK_USER)
            .ok()
            .flatten()
            .is_some()
        {
            *done = true;
            return;
        }
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(TASK_USER)
            .stdout(Stdio::null())
            .status()
            .expect("running useradd (package passwd)");
        // 9: the name was taken meanwhile, which is as good.
        if status.success() || status.code() == Some(9) {
            continue;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("could not create the user {TASK_USER}");
}

/// Whether `mode` can run on this machine; if not, says why (loudly).
fn available(story: &str, mode: Mode) -> bool {
    if mode != Mode::Sandbox {
        if !is_root() {
            skip(story, "a task user needs the test to run as root");
            return false;
        }
        ensure_task_user();
    }
    let path = std::env::var_os("PATH");
    let request = sandbox::Request {
        task_user: (mode != Mode::Sandbox).then_some(TASK_USER),
        unsandboxed: mode == Mode::TaskUser,
        path: path.as_deref(),
        ..sandbox::Request::default()
    };
    match sandbox::choose(&request) {
        Ok(Isolation::Sandbox(_)) if mode.sandboxed() => true,
        Ok(Isolation::TaskUser { .. }) if mode == Mode::TaskUser => true,
        Ok(other) => {
            skip(
                story,
                &format!("the runner would use: {}", other.describe()),
            );
            false
        }
        Err(e) => {
            skip(story, &format!("{e}"));
            false
        }
    }
}

/// One story's cluster, with the runner's secrets and state laid out where
/// the hostile pipeline will look for them.
struct Target {
    scene: Scene,
    token_file: PathBuf,
    config_file: PathBuf,
    work: PathBuf,
    runner_pid: u32,
}

fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn target(mode: Mode) -> Target {
    let mut scene = Scene::with_token(&[], Some(TOKEN)).expect("starting the dispatcher");
    // The task user must be able to reach the runner's work dir below the
    // scene; the dispatcher's state stays its own (0700), as any
    // co-located daemon's should be.
    std::fs::set_permissions(scene.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&scene.state, std::fs::Permissions::from_mode(0o700)).unwrap();
    let token_file = scene.path().join("runner-token");
    private_file(&token_file, &format!("{TOKEN}\n"));
    let config_file = scene.path().join("runner.toml");
    private_file(&config_file, &format!("labels = [\"{CONFIG_SECRET}\"]\n"));
    let token_arg = token_file.display().to_string();
    let config_arg = config_file.display().to_string();
    let mut args = vec![
        "--slots",
        "2",
        "--token-file",
        &token_arg,
        "--config",
        &config_arg,
    ];
    args.extend(mode.flags());
    scene
        .add_runner_with("r1", &scene.addr.clone(), &args, &RUNNER_SECRETS)
        .unwrap();
    scene.wait_runners(&["r1"]).unwrap();
    let runner_pid = scene.runner("r1").unwrap().pid().unwrap();
    let work = scene.work_dir("r1").canonicalize().unwrap();
    Target {
        scene,
        token_file,
        config_file,
        work,
        runner_pid,
    }
}

/// An attack: a task that must fail, and what its log must then say.
struct Attack {
    name: &'static str,
    run: String,
    denial: String,
}

fn attacks(t: &Target, mode: Mode, other_checkout: &Path, mirror: &Path) -> Vec<Attack> {
    let db = t.scene.state.join(surveil_dispatcher::store::DB_FILE);
    let denial = mode.denial().to_owned();
    let read = |name, path: &Path| Attack {
        name,
        run: format!("cat '{}'", path.display()),
        denial: denial.clone(),
    };
    let mut attacks = vec![
        read("read-token-file", &t.token_file),
        read("read-runner-config", &t.config_file),
        read(
            "read-runner-environ",
            &PathBuf::from(format!("/proc/{}/environ", t.runner_pid)),
        ),
        read("read-dispatcher-database", &db),
        Attack {
            name: "list-outbox",
            run: format!("ls -la '{}'", t.work.join("outbox").display()),
            denial: denial.clone(),
        },
        Attack {
            name: "write-mirror",
            run: format!("echo poisoned > '{}'", mirror.join("HEAD").display()),
            denial: match mode {
                // The directory is not there, so the shell cannot create
                // the file ("Directory nonexistent").
                Mode::Sandbox | Mode::SandboxAsUser => "cannot create".to_owned(),
                Mode::TaskUser => denial.clone(),
            },
        },
    ];
    // Jobs of one task user share a uid: only the sandbox keeps their
    // checkouts apart (docs/security.md says so).
    if mode.sandboxed() {
        attacks.push(read(
            "read-other-checkout",
            &other_checkout.join(".surveil.toml"),
        ));
    }
    attacks
}

/// The hostile commit's pipeline: a real build, the environment, the two
/// network tasks, a look around the work dir, then every attack.
fn hostile_pipeline(t: &Target, port: u16, attacks: &[Attack]) -> String {
    let mut toml = format!(
        r#"[[task]]
name = "build"
run = '''d=$(mktemp -d /tmp/build.XXXXXX) && cc -o "$d/hello" hello.c && "$d/hello" > built.txt && cat built.txt && echo scratch > "$d/scratch" && echo "tmp: $(cat "$d/scratch")" && rm -r "$d" && id -u'''

[[task]]
name = "env"
run = "env"

[[task]]
name = "offline"
network = false
allow_failure = true
run = '''bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' && echo OFFLINE-CONNECTED'''

[[task]]
name = "online"
run = '''bash -c 'echo hi > /dev/tcp/127.0.0.1/{port}' && echo ONLINE-CONNECTED'''

[[task]]
name = "look-around"
allow_failure = true
run = '''ls -a '{work}' '{work}/jobs' '''
"#,
        work = t.work.display()
    );
    for attack in attacks {
        toml.push_str(&format!(
            "\n[[task]]\nname = \"{}\"\nallow_failure = true\nrun = '''{}'''\n",
            attack.name, attack.run
        ));
    }
    toml
}

const HELLO_C: &str =
    "#include <stdio.h>\nint main(void) { puts(\"hello from a sandboxed build\"); return 0; }\n";

/// The job's combined log, as `surveil logs ID` prints it.
fn log_text(t: &Target, id: u64) -> String {
    let out = Command::new(&bins().cli)
        .args(["--dispatch", &t.scene.addr, "logs", &id.to_string()])
        .env("SURVEIL_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What task `name` wrote (its stdout and stderr lines, not the runner's
/// `[surveil]` lines about it).
fn output(log: &str, name: &str) -> String {
    let own = format!("[surveil] task `{name}`");
    let mut lines = log.lines().skip_while(|l| !l.starts_with(&own));
    assert!(
        lines.next().is_some(),
        "no task `{name}` in the log:\n{log}"
    );
    lines
        .take_while(|l| {
            l.starts_with(&own)
                || !(l.starts_with("[surveil] task `") || l.starts_with("[surveil] job "))
        })
        .filter(|l| !l.starts_with("[surveil]"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Every file under `dir` (the mirror), with its contents.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

/// Accepted connections on `listener` (non-blocking), without waiting.
fn connections(listener: &TcpListener) -> usize {
    let mut count = 0;
    while listener.accept().is_ok() {
        count += 1;
    }
    count
}

fn hostile_story(story: &str, mode: Mode) {
    if !available(story, mode) {
        return;
    }
    let mut t = target(mode);
    // Another job holds its checkout while the hostile one runs (slots 2).
    let gate = t.scene.gate("other");
    let other_commit = t.scene.commit_gated("the other job", &gate).unwrap();
    let [other] = t.scene.submit(&[&other_commit]).unwrap()[..] else {
        panic!("one job id expected")
    };
    t.scene.wait_running(other).unwrap();
    let workspace = Workspace::open(&t.work).unwrap();
    let other_checkout = workspace.job_dir(other, 1);
    let mirror = workspace.mirror_path(&t.scene.repo);
    cluster::wait_for("the other job's checkout", STEP, POLL, || {
        Ok(other_checkout.join(".surveil.toml").exists().then_some(()))
    })
    .unwrap();
    let head = std::fs::read(mirror.join("HEAD")).expect("the mirror exists on the host");

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let attacks = attacks(&t, mode, &other_checkout, &mirror);
    let pipeline = hostile_pipeline(&t, port, &attacks);
    let commit = cluster::commit(
        &t.scene.repo_dir,
        "a hostile pipeline",
        &[(".surveil.toml", &pipeline), ("hello.c", HELLO_C)],
    )
    .unwrap();
    let [id] = t.scene.submit(&[&commit]).unwrap()[..] else {
        panic!("one job id expected")
    };
    let job = t.scene.wait_final(id).unwrap();
    t.scene.open(&gate).unwrap();
    let log = log_text(&t, id);
    assert_eq!(
        status_of(&job),
        JobStatus::Passed,
        "{}\n{log}",
        describe(&job)
    );
    let task = |name: &str| {
        job.tasks
            .iter()
            .find(|task| task.name == name)
            .unwrap_or_else(|| panic!("no task {name}: {}", describe(&job)))
    };

    let isolation = match mode {
        Mode::Sandbox | Mode::SandboxAsUser => "isolation: bubblewrap sandbox (",
        Mode::TaskUser => "isolation: task user: tasks run as user surveil-task",
    };
    assert!(log.contains(isolation), "{log}");

    // Every attack failed, and its log says why.
    for attack in &attacks {
        assert_eq!(
            task(attack.name).status(),
            TaskStatus::Failed,
            "attack `{}` ({}) was not stopped:\n{log}",
            attack.name,
            attack.run
        );
        let text = output(&log, attack.name);
        assert!(
            text.contains(&attack.denial),
            "attack `{}`: no `{}` in its log:\n{text}",
            attack.name,
            attack.denial
        );
    }
    let mut secrets = vec![TOKEN, CONFIG_SECRET];
    secrets.extend(RUNNER_SECRETS.iter().map(|(_, value)| *value));
    for secret in secrets {
        assert!(!log.contains(secret), "`{secret}` reached the log:\n{log}");
    }
    // The hostile job's own fetch added its commit to the mirror; the task
    // itself wrote nothing there.
    assert_eq!(std::fs::read(mirror.join("HEAD")).unwrap(), head);
    for (file, bytes) in files_under(&mirror) {
        assert!(
            !bytes.windows(8).any(|w| w == b"poisoned"),
            "{} was written by the task",
            file.display()
        );
    }

    // The real build passed, writing to its checkout and /tmp.
    assert_eq!(task("build").status(), TaskStatus::Passed, "{log}");
    let build = output(&log, "build");
    assert!(build.contains("hello from a sandboxed build"), "{build}");
    assert!(build.contains("tmp: scratch"), "{build}");
    let uid = match mode {
        Mode::Sandbox => 0,
        Mode::SandboxAsUser | Mode::TaskUser => nix::unistd::User::from_name(TASK_USER)
            .unwrap()
            .unwrap()
            .uid
            .as_raw(),
    };
    assert!(
        build.lines().any(|l| l == uid.to_string()),
        "uid {uid}: {build}"
    );

    // The environment is the allowlist plus the job's own variables.
    let env = output(&log, "env");
    for name in ["SURVEIL_TOKEN", "SSH_AUTH_SOCK", "FOO_KEY", "DATABASE_URL"] {
        assert!(
            !env.contains(&format!("{name}=")),
            "{name} reached the task:\n{env}"
        );
    }
    assert!(env.contains(&format!("SURVEIL_JOB_ID={id}")), "{env}");
    assert!(env.contains(&format!("SURVEIL_COMMIT={commit}")), "{env}");

    // network = false: no way to the test's listener; without it, a way.
    assert_eq!(task("online").status(), TaskStatus::Passed, "{log}");
    assert!(output(&log, "online").contains("ONLINE-CONNECTED"));
    let offline = output(&log, "offline");
    assert!(!offline.contains("OFFLINE-CONNECTED"), "{offline}");
    let offline_task = task("offline");
    if mode.sandboxed() {
        assert_eq!(offline_task.status(), TaskStatus::Failed, "{log}");
        assert!(offline.contains("Connection refused"), "{offline}");
    } else {
        // Not honoured, so not run.
        assert_eq!(offline_task.status(), TaskStatus::Error, "{log}");
        assert!(
            offline_task
                .message
                .starts_with("`network = false` needs the bubblewrap sandbox"),
            "{}",
            offline_task.message
        );
    }
    assert_eq!(
        connections(&listener),
        1,
        "only the `online` task got through"
    );

    // What the task can see of the work dir: its own checkout only.
    let look = output(&log, "look-around");
    if mode.sandboxed() {
        assert!(look.contains(&format!("{id}-1")), "{look}");
        for hidden in ["outbox", "mirrors", &format!("{other}-1")] {
            assert!(!look.contains(hidden), "`{hidden}` is visible:\n{look}");
        }
    } else {
        assert!(look.contains("Permission denied"), "{look}");
    }
    let done = t.scene.wait_final(other).unwrap();
    assert_eq!(status_of(&done), JobStatus::Passed, "{}", describe(&done));
}

#[test]
fn a_hostile_pipeline_in_the_sandbox_reaches_none_of_surveils_secrets() {
    hostile_story("hostile pipeline, bubblewrap sandbox", Mode::Sandbox);
}

#[test]
fn a_hostile_pipeline_in_the_sandbox_as_a_task_user_reaches_none_of_them() {
    hostile_story(
        "hostile pipeline, bubblewrap sandbox as a task user",
        Mode::SandboxAsUser,
    );
}

#[test]
fn a_hostile_pipeline_as_a_task_user_without_sandbox_reaches_none_of_them() {
    hostile_story(
        "hostile pipeline, --task-user without a sandbox",
        Mode::TaskUser,
    );
}
