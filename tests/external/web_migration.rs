//! The console page while its guest live-migrates (docs/operations.md, "When a guest moves"),
//! in headless Chromium against real nodes and a real gateway: a page loaded from the source
//! node opens the same console on the destination (`&from=N`) and shows every line once; a
//! page loaded through the gateway just goes on (the gateway follows), every line once, and
//! its typing reaches the guest on the destination.

use super::web_console::{require_tools, url_encode, Browser, LIVE};
use crate::support;

use conlog::proto::Access;
use support::*;

const LINES: usize = 120;

/// The numbered lines shown by `page`, in order (conlog's own notices left out).
async fn shown_lines(browser: &mut Browser, page: &str) -> Vec<String> {
    browser
        .text(page)
        .await
        .lines()
        .filter(|l| l.starts_with("line "))
        .map(|l| l.trim_end().to_owned())
        .collect()
}

fn lines(range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|n| numbered_line(n).trim_end().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_pages_follow_a_guest_that_moves() {
    require_tools(true);
    let (_pki, daemons, gateway) = migration_fleet(2).await;
    let nodes = vec![
        MigrationNode::of(&daemons[0]).await,
        MigrationNode::of(&daemons[1]).await,
    ];
    let guest = first_migrating_guest(&nodes[0]).await;
    let read = daemons[0]
        .token(MIGRATING_GUEST, "", Access::Read, 600)
        .await;
    let write = daemons[0]
        .token(MIGRATING_GUEST, "", Access::ReadWrite, 600)
        .await;
    let page = |port: u16, token: &str| {
        format!(
            "https://localhost:{port}/console/?guest={MIGRATING_GUEST}&device={DEVICE}#token={}",
            url_encode(token)
        )
    };
    let mut browser = Browser::launch().await;
    browser
        .open_insecure("direct", &page(daemons[0].tcp.port(), &read))
        .await;
    browser
        .open_insecure("gateway", &page(gateway.address.port(), &write))
        .await;
    browser.wait("direct", LIVE).await;
    browser.wait("gateway", LIVE).await;

    let moved_at = random_between(20, LINES - 20);
    eprintln!("moving at line {moved_at}");
    let driver = drive_guest(guest, nodes.clone(), vec![moved_at], LINES, None);
    let last = format!("line {:06}", LINES - 1);
    let to = &nodes[1].endpoint;
    browser
        .wait(
            "direct",
            &format!(
                "location.host === '{to}' && window.conlog !== undefined && \
                 window.conlog.text().includes('{last}')"
            ),
        )
        .await;
    browser
        .wait(
            "gateway",
            &format!("window.conlog.text().includes('{last}')"),
        )
        .await;
    let mut guest = bounded("the guest driver", driver).await.expect("driver");

    // The page opened on the destination resumes where the source's page was: at or before
    // the move (it had shown everything the source logged), every line after it once.
    let direct = shown_lines(&mut browser, "direct").await;
    let first: usize = direct
        .first()
        .and_then(|l| l.strip_prefix("line "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no lines on the destination's page: {direct:?}"));
    assert!(
        first <= moved_at,
        "the page on the destination starts at line {first}, after the move at {moved_at}"
    );
    assert_eq!(
        direct,
        lines(first..LINES),
        "the direct page on the destination"
    );
    let search = browser.eval("direct", "location.search").await;
    assert!(
        search.as_str().unwrap_or_default().contains("from="),
        "{search}"
    );
    assert_eq!(
        shown_lines(&mut browser, "gateway").await,
        lines(0..LINES),
        "the page through the gateway"
    );

    browser.click("gateway", "#terminal").await;
    browser.type_text("gateway", "typed after the move").await;
    guest.wait_for(b"typed after the move").await;
    browser.exit().await;
}
