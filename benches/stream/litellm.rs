//! The optional `litellm` section (issue 10, point 9; never in CI): the LiteLLM proxy as a peer,
//! the same load through its `/v1/chat/completions` and through coachd's, against the same fake,
//! in one run. LiteLLM comes from its own venv (`scripts/litellm` installs the pinned release into
//! `.services/litellm-venv`); it runs with a config file that points an `openai/...` model at the
//! fake, no database, no callbacks, on loopback, logging at warning.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::BoxError;
use crate::coachd::{Placement, child_log, free_port, start_coachd, wait_until_up};
use crate::fake::FakeProcess;
use crate::load::{Level, PathKind, Servers, run_levels};
use crate::report::{print_added, print_rows};

/// The release `scripts/litellm` pins; the venv must hold exactly this one.
const VERSION: &str = "1.105.1";

/// The model name clients ask LiteLLM for (its config maps it to the fake).
pub const MODEL: &str = "bench";

/// LiteLLM's master key, which clients send as `Authorization: Bearer` (it refuses to start
/// without one; coachd checks an API key too, so both paths authenticate each request).
pub const MASTER_KEY: &str = "sk-bench-key";

/// The paths of this section: the baseline, coachd's OpenAI route and LiteLLM's.
const PATHS: [PathKind; 3] = [PathKind::Direct, PathKind::ChatCompletions, PathKind::LiteLlm];

/// A running LiteLLM proxy; killed on drop, its config directory removed.
#[derive(Debug)]
pub struct LiteLlm {
    child: Child,
    pub base: String,
    dir: PathBuf,
}

impl LiteLlm {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LiteLlm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `COACHD_BENCH_LITELLM_VENV`, else `.services/litellm-venv` of this checkout.
fn venv() -> PathBuf {
    std::env::var_os("COACHD_BENCH_LITELLM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".services/litellm-venv"))
}

/// Whether the venv holds the pinned release (its `dist-info` directory).
fn has_pinned_release(venv: &Path) -> bool {
    let Ok(libs) = std::fs::read_dir(venv.join("lib")) else {
        return false;
    };
    libs.flatten().any(|python| {
        python
            .path()
            .join(format!("site-packages/litellm-{VERSION}.dist-info"))
            .is_dir()
    })
}

fn config(fake_base_url: &str) -> String {
    // A master key and no database (the key is checked in memory), no callbacks: the proxy's
    // streaming path alone.
    format!(
        r#"model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {fake_base_url}
      api_key: bench
litellm_settings:
  callbacks: []
  success_callback: []
  failure_callback: []
  drop_params: true
  request_timeout: 600
general_settings:
  master_key: {MASTER_KEY}
"#
    )
}

async fn start(venv: &Path, fake_base_url: &str, placement: Placement) -> Result<LiteLlm, BoxError> {
    let dir = std::env::temp_dir().join(format!("coachd-bench-litellm-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("config.yaml");
    std::fs::write(&config_path, config(fake_base_url))?;
    let port = free_port()?;
    let program = venv.join("bin/litellm");
    let mut child = placement
        .command(&program.to_string_lossy())
        .args(["--config", &config_path.to_string_lossy()])
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--num_workers",
            "1",
        ])
        .env_clear()
        .env("PATH", format!("{}:/usr/bin:/bin", venv.join("bin").display()))
        .env("HOME", &dir)
        .env("LITELLM_LOG", "WARNING")
        // Everything from disk, nothing fetched at start (the model cost map, the UI's posts).
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_LOCAL_BLOG_POSTS", "True")
        .env("LITELLM_DONT_SHOW_FEEDBACK_BOX", "True")
        .env("DISABLE_ADMIN_UI", "True")
        .env("NO_DOCS", "True")
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(child_log())
        .stderr(child_log())
        .spawn()?;
    let base = format!("http://127.0.0.1:{port}");
    // Python imports take a while on a busy machine.
    if let Err(e) = wait_until_up(
        &format!("{base}/health/liveliness"),
        Duration::from_secs(180),
        &mut child,
    )
    .await
    {
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_dir_all(&dir);
        return Err(format!("LiteLLM did not start (COACHD_BENCH_LOG=1 shows its output): {e}").into());
    }
    Ok(LiteLlm { child, base, dir })
}

pub async fn run(fake: &mut FakeProcess, placement: Placement, levels: &[Level]) -> Result<(), BoxError> {
    let venv = venv();
    if !has_pinned_release(&venv) {
        let message = format!(
            "\n(litellm: skipped; no LiteLLM {VERSION} venv at {}. Install it with `scripts/litellm` \
             (binary wheels only, into .services/litellm-venv), or point COACHD_BENCH_LITELLM_VENV at one)",
            venv.display()
        );
        println!("{message}");
        eprintln!("{message}");
        return Ok(());
    }
    let coachd = start_coachd(fake.base_url(), placement, &[]).await?;
    let litellm = start(&venv, fake.base_url(), placement).await?;
    println!("\nLiteLLM {VERSION} from {}", venv.display());
    let servers = Servers {
        coachd: &coachd,
        litellm: Some(&litellm),
    };
    let rows = run_levels(fake, servers, levels, &PATHS).await?;
    println!("\n## coachd and LiteLLM side by side (OpenAI-compatible streaming, same fake)\n");
    print_rows(&rows);
    print_added(&rows);
    Ok(())
}
