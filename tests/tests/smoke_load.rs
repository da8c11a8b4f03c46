use palisade_tests::fixture::Classifier;

#[test]
fn classifier_loads_and_passes_verifier() {
    let mut c = Classifier::load().expect("load");
    // Ethernet + minimal IPv4/TCP SYN from 10.0.0.2:1000 to 10.0.0.3:80, no endpoint registered.
    let mut frame = vec![0u8; 14 + 20 + 20];
    frame[12] = 0x08;
    frame[14] = 0x45;
    frame[16..18].copy_from_slice(&40u16.to_be_bytes());
    frame[23] = 6;
    frame[26..30].copy_from_slice(&[10, 0, 0, 2]);
    frame[30..34].copy_from_slice(&[10, 0, 0, 3]);
    frame[34..36].copy_from_slice(&1000u16.to_be_bytes());
    frame[36..38].copy_from_slice(&80u16.to_be_bytes());
    frame[46] = 0x50;
    frame[47] = 0x02;
    let run = c.run(policy_common::Direction::Egress, &frame).unwrap();
    assert!(run.dropped(), "{run:?}");
}
