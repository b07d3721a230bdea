//! Injected AWS errors reach the SDK as AWS would send them. The bed's error rules apply to every
//! call it answers, so these tests live in their own binary: cargo runs test binaries one at a
//! time, and no other test's calls can use up (or trip over) the armed errors.
mod support;

use support::{AsgSpec, Bed, unique};

/// The armed rules are global, so the tests in this binary take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn injected_throttling_reaches_the_sdk_and_its_retries_get_through() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let bed = Bed::connect().await;
    let asg = unique("throttle");
    bed.create_asg(AsgSpec {
        name: &asg,
        spot: false,
        desired: 0,
        max: 2,
        labels: &[],
    })
    .await;
    bed.arm_errors("throttling", 2, &["SetDesiredCapacity"]).await;

    // The SDK's standard retry mode (3 attempts, backoff with jitter) absorbs two throttles.
    let result = bed
        .autoscaling
        .set_desired_capacity()
        .auto_scaling_group_name(&asg)
        .desired_capacity(1)
        .send()
        .await;
    bed.clear_errors().await;
    result.expect("the third attempt succeeds");

    let statuses: Vec<u16> = bed
        .calls("SetDesiredCapacity", &asg)
        .await
        .iter()
        .map(|call| call.status)
        .collect();
    assert_eq!(
        statuses,
        vec![400, 400, 200],
        "two throttled attempts, then one that reached moto"
    );
}

#[tokio::test]
async fn injected_server_errors_fail_the_call_when_retries_run_out() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let bed = Bed::connect().await;
    let asg = unique("fivexx");
    bed.create_asg(AsgSpec {
        name: &asg,
        spot: false,
        desired: 0,
        max: 2,
        labels: &[],
    })
    .await;
    bed.arm_errors("server", 3, &["SetDesiredCapacity"]).await;

    let result = bed
        .autoscaling
        .set_desired_capacity()
        .auto_scaling_group_name(&asg)
        .desired_capacity(1)
        .send()
        .await;
    bed.clear_errors().await;

    let error = result.expect_err("three 500s exhaust the SDK's three attempts");
    let text = format!("{:?}", aws_sdk_autoscaling::error::DisplayErrorContext(&error));
    assert!(text.contains("InternalFailure"), "{text}");
    let group = bed
        .autoscaling
        .describe_auto_scaling_groups()
        .auto_scaling_group_names(&asg)
        .send()
        .await
        .unwrap();
    assert_eq!(
        group.auto_scaling_groups()[0].desired_capacity(),
        Some(0),
        "a failed call changed nothing"
    );
}
