//! `cargo xtask mutants`: proves that the suite bites. Each mutant is one deliberate fault,
//! built into the program or the controller by `router-ctl/build.rs` when ROUTER_XDP_MUTANT
//! names it, and only under the `mutants` profile (`target/mutants/`); a release build refuses
//! the variable. For each mutant the tests that must catch the fault are run against the
//! faulty build: the mutant is killed when one of them fails on its own claim (the test ran,
//! past its set-up, and reported FAILED); a build or verifier error, a crash or a set-up failure
//! (`tests::in_setup`) is reported and proves nothing. It survives when none is killed.
//!
//! First the same tests run on an unmutated build of the same profile: they must pass there,
//! or a kill would prove nothing.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};

/// A deliberate fault and the tests (test binary, name filter) that must catch it.
pub struct Mutant {
    pub name: &'static str,
    pub fault: &'static str,
    pub tests: &'static [(&'static str, &'static str)],
}

pub const MUTANTS: &[Mutant] = &[
    Mutant {
        name: "nat_ignored",
        fault: "the fast path never looks NAT flows up (the kernel carries all NAT'd traffic)",
        tests: &[
            (
                "packet",
                "nat_flows_are_translated_byte_exact_and_the_rest_is_the_kernels",
            ),
            (
                "nat",
                "snat_floating_ip_hairpin_and_tenant_traffic_follow_the_agents_rules",
            ),
        ],
    },
    Mutant {
        name: "nat_no_retire",
        fault: "a TCP SYN, FIN or RST of a copied NAT flow goes to the kernel but leaves the copy in use, and a SYN without a copy moves no generation (a reused client port meets a closed connection's mapping)",
        tests: &[
            ("packet", "nat_copies_are_retired_by_the_packets_that_end_them"),
            ("nat_reuse", "snat_client_port_reused_after_the_client_resets"),
            (
                "nat_reuse",
                "snat_client_port_reused_while_the_server_closes_first",
            ),
        ],
    },
    Mutant {
        name: "nat_learn_off",
        fault: "the fast path never learns a flow from its handshake (every short connection through NAT is the kernel's alone)",
        tests: &[
            (
                "packet",
                "nat_flows_are_learned_from_the_handshakes_the_kernel_translates",
            ),
            (
                "nat_reuse",
                "request_sized_connections_are_carried_from_their_first_request",
            ),
        ],
    },
    Mutant {
        name: "nat_learn_unproven",
        fault: "the fast path learns a flow from any ACK after its SYN-ACK, not only one that acknowledges the SYN-ACK's sequence number",
        tests: &[(
            "packet",
            "nat_flows_are_learned_from_the_handshakes_the_kernel_translates",
        )],
    },
    Mutant {
        name: "nat_learned_survive_purge",
        fault: "the flows the program learned through a floating IP survive its removal (the fast path goes on translating to the old instance)",
        tests: &[(
            "nat_reuse",
            "a_learned_flow_through_a_floating_ip_ends_with_the_floating_ip",
        )],
    },
    Mutant {
        name: "nat_learned_unchecked",
        fault: "the fast path uses a learned flow's slot without checking that it holds one flow whole (a mix of two written at once)",
        tests: &[(
            "packet",
            "nat_flows_are_learned_from_the_handshakes_the_kernel_translates",
        )],
    },
    Mutant {
        name: "nat_stale_used",
        fault: "the fast path uses a NAT copy whatever its generation and time (a copy taken before a connection's start or end, or past the kernel entry's timeout)",
        tests: &[
            ("packet", "nat_copies_are_retired_by_the_packets_that_end_them"),
            (
                "nat_expiry",
                "a_copy_is_not_used_after_the_kernel_may_have_dropped_its_entry",
            ),
            (
                "nat_reuse",
                "a_learned_flow_whose_connection_goes_quiet_stops_being_used",
            ),
        ],
    },
    Mutant {
        name: "nat_untranslated_out",
        fault: "packets without a NAT flow leave through the gateway untranslated",
        tests: &[
            (
                "packet",
                "nat_flows_are_translated_byte_exact_and_the_rest_is_the_kernels",
            ),
            (
                "nat",
                "snat_floating_ip_hairpin_and_tenant_traffic_follow_the_agents_rules",
            ),
        ],
    },
    Mutant {
        name: "nat_udp_zero_updated",
        fault: "a UDP checksum of 0 (none) is updated by NAT as if it were one",
        tests: &[
            (
                "packet",
                "nat_flows_are_translated_byte_exact_and_the_rest_is_the_kernels",
            ),
            (
                "nat",
                "the_fast_path_translates_what_the_kernels_nat_translates",
            ),
        ],
    },
    Mutant {
        name: "adopted_devices_stay",
        fault: "devices apply moved in from the caller's namespace are left in the router's namespace by a rollback and by destroy (and die with a namespace apply created)",
        tests: &[
            (
                "safety",
                "a_failed_first_apply_and_a_destroy_give_adopted_devices_back",
            ),
            (
                "safety",
                "open_vswitch_internal_ports_outlive_a_failed_apply_a_killed_apply_and_a_destroy",
            ),
        ],
    },
    Mutant {
        name: "fencer_unsupervised",
        fault: "the agent starts the fencer once and never again (a fencer that died stays dead)",
        tests: &[("ha", "a_killed_fencer_is_started_again")],
    },
    Mutant {
        name: "fence_write_ignored",
        fault: "the agent goes on renewing its lease when it cannot write the fencer's deadline (a full /run): the fencer fences routers whose lease lives on",
        tests: &[(
            "lib",
            "agent::run::tests::a_fence_file_that_cannot_be_written_stops_the_renewals",
        )],
    },
    Mutant {
        name: "no_backoff",
        fault: "the agent tries a router whose apply failed again on every pass (five times a second)",
        tests: &[("lib", "agent::applier::tests::failed_applies_back_off")],
    },
    Mutant {
        name: "no_map_renewal",
        fault: "a counters' map pinned by an earlier build with another layout is refused instead of replaced",
        tests: &[(
            "upgrade",
            "an_upgrade_that_changes_the_counters_layout_keeps_forwarding",
        )],
    },
    Mutant {
        name: "nat_no_refresh",
        fault: "the daemon never refreshes the kernel's timeouts of flows the fast path carries",
        tests: &[(
            "nat",
            "flows_in_use_stay_alive_in_the_kernel_and_idle_ones_are_forgotten",
        )],
    },
    Mutant {
        name: "fence_never",
        fault: "the fencer never fences the HA routers of a host whose lease expired (no ARP/ND \
                fence, no address removed)",
        tests: &[
            (
                "ha",
                "a_host_cut_off_from_etcd_is_fenced_and_returns_as_standby",
            ),
            (
                "ha",
                "the_standby_takes_over_when_the_active_agent_is_killed",
            ),
        ],
    },
    Mutant {
        name: "ha_no_track",
        fault: "the active host keeps an HA router when one of its devices loses its link",
        tests: &[("ha", "the_active_resigns_when_its_provider_link_goes_down")],
    },
    Mutant {
        name: "replica_not_sent",
        fault: "the active host never sends its HA routers' connections to the standbys",
        tests: &[(
            "ha",
            "connections_through_snat_and_a_floating_ip_survive_a_failover",
        )],
    },
    Mutant {
        name: "replica_untranslated",
        fault: "a connection installed from another host's table loses its translation",
        tests: &[
            (
                "nat",
                "a_connection_installed_from_a_dump_keeps_its_translation_state_and_mark",
            ),
            (
                "ha",
                "connections_through_snat_and_a_floating_ip_survive_a_failover",
            ),
        ],
    },
    Mutant {
        name: "replica_uncounted",
        fault: "a standby installs connection state without counting it in its metrics",
        tests: &[(
            "ha",
            "connections_through_snat_and_a_floating_ip_survive_a_failover",
        )],
    },
    Mutant {
        name: "replica_table_frozen",
        fault: "the active host's agent reads an HA router's table once and never again (events ignored, no whole reads)",
        tests: &[(
            "ha",
            "connections_through_snat_and_a_floating_ip_survive_a_failover",
        )],
    },
    Mutant {
        name: "replica_clash_kept",
        fault: "a standby keeps an entry in the way of an installed connection (the translated tuple held by another, or the same tuple translated otherwise)",
        tests: &[(
            "nat",
            "a_connection_installed_from_a_dump_keeps_its_translation_state_and_mark",
        )],
    },
    Mutant {
        name: "replica_skip_ignores_ids",
        fault: "the active host's agent skips looking up a tuple whose last event ended a connection even when another entry with those tuples began meanwhile",
        tests: &[(
            "lib",
            "agent::replica::tests::connections_over_between_two_reads_are_not_looked_up_unless_tuples_were_reused",
        )],
    },
    Mutant {
        name: "replica_unauthenticated",
        fault: "the connection-state stream accepts peers and frames without checking their HMAC",
        tests: &[(
            "lib",
            "agent::replica::tests::only_holders_of_the_key_get_through_and_frames_cannot_be_changed_or_replayed",
        )],
    },
    Mutant {
        name: "standby_keeps_addresses",
        fault: "apply gives a standby the router's addresses",
        tests: &[("ha", "a_restart_within_the_lease_causes_no_failover")],
    },
    Mutant {
        name: "no_quarantine",
        fault: "a route table group or nexthop freed by a change is reused at once, before the \
                lookups that may hold it are done",
        tests: &[(
            "lib",
            "fib::live::tests::mixed_changes_share_nexthops_across_families",
        )],
    },
    Mutant {
        name: "block_in_place",
        fault: "an IPv6 route change rewrites a block of ranges where lookups read it instead \
                of writing a fresh block and switching the entry to it",
        tests: &[(
            "lib",
            "fib::live::tests::single_ipv6_changes_match_a_reference_at_every_write",
        )],
    },
    Mutant {
        name: "long_always_lpm",
        fault: "every IPv6 /64 holding a longer prefix (a router's own address in its subnet) \
                sends its lookups to the LPM trie instead of a block of the lower 64 bits",
        tests: &[(
            "lib",
            "fib::six::tests::longer_prefixes_in_a_64_take_a_block_of_the_lower_bits",
        )],
    },
    Mutant {
        name: "wrong_level_order",
        fault: "a route change writes the first level before the groups below it",
        tests: &[("packet", "single_route_changes_are_never_seen_half_done")],
    },
    Mutant {
        name: "stale_table_kept",
        fault: "the daemon changes the route table it keeps in memory even after another \
                process rewrote the maps",
        tests: &[(
            "netns",
            "route_batches_change_the_kernel_and_the_fast_path_route_by_route",
        )],
    },
    Mutant {
        name: "nat_icmp_errors_to_kernel",
        fault: "ICMP errors about NAT flows are left to the kernel instead of translated",
        tests: &[
            (
                "packet",
                "icmp_errors_about_nat_flows_are_translated_byte_exact",
            ),
            (
                "nat",
                "the_fast_path_translates_what_the_kernels_nat_translates",
            ),
        ],
    },
    Mutant {
        name: "nat_conf_off",
        fault: "the controller never turns NAT on in the fast path",
        tests: &[(
            "nat",
            "snat_floating_ip_hairpin_and_tenant_traffic_follow_the_agents_rules",
        )],
    },
    Mutant {
        name: "guard_ignored",
        fault: "the program forwards by route whatever the namespace's foreign netfilter rules say (GUARDED ignored)",
        tests: &[(
            "guard",
            "foreign_rules_are_never_bypassed_and_accepted_flows_are_carried",
        )],
    },
    Mutant {
        name: "kernel_policy_ignored",
        fault: "the program forwards from a port whose family the namespace leaves to the kernel (forwarding off, policy rules)",
        tests: &[
            (
                "packet",
                "what_the_namespace_leaves_to_its_kernel_is_passed_untouched",
            ),
            (
                "follow",
                "forwarding_switches_blackholes_and_policy_rules_are_followed",
            ),
        ],
    },
    Mutant {
        name: "kernel_routes_ignored",
        fault: "a followed namespace's blackhole, unreachable or foreign-device routes never reach the fast path's table",
        tests: &[(
            "follow",
            "forwarding_switches_blackholes_and_policy_rules_are_followed",
        )],
    },
    Mutant {
        name: "signals_after_pid_file",
        fault: "the daemon names itself in its pid file before it takes SIGUSR1, so an apply's rescan signal in between ends it",
        tests: &[(
            "netns",
            "a_daemon_signalled_as_soon_as_it_names_itself_keeps_running",
        )],
    },
    Mutant {
        name: "unscheduled_candidates_count",
        fault: "a candidacy of a host the HA router is not scheduled on counts in its election: \
                a host takes a router's role by writing its own keys",
        tests: &[(
            "etcd_auth",
            "agents_and_the_cli_work_with_their_credentials_and_nothing_else_does",
        )],
    },
    Mutant {
        name: "no_legacy_mirror",
        fault: "the active host does not mirror its role into the previous layout's key, so an \
                older agent on the standby host would take the role too during an upgrade",
        tests: &[("ha", "the_standby_takes_over_when_the_active_agent_is_killed")],
    },
    Mutant {
        name: "elections_without_fencer",
        fault: "a host stands for HA roles whether or not a live fencer acknowledges its \
                deadline, and a stuck fencer is never replaced",
        tests: &[(
            "ha",
            "a_host_whose_fencer_stops_acknowledging_stands_for_nothing_until_it_is_replaced",
        )],
    },
    Mutant {
        name: "renewed_without_fence_room",
        fault: "an agent whose fence file cannot be written (a full /run) renews its lease at \
                each reconnection: the fencer fences at its old deadline while the lease lives, \
                and no standby takes the router over",
        tests: &[(
            "ha",
            "a_full_run_directory_on_the_active_host_moves_the_router_without_two_answering",
        )],
    },
    Mutant {
        name: "log_failure_kills",
        fault: "a log line that cannot be written is reported on stderr, the same full file: \
                the panic ends the fencer, and the host answers for the router with the standby",
        tests: &[(
            "ha",
            "a_full_run_directory_on_the_active_host_moves_the_router_without_two_answering",
        )],
    },
    Mutant {
        name: "ra_solicitations_ignored",
        fault: "router solicitations are never answered: an instance waits up to 16 s, then \
                30 to 100 s, for the next periodic advertisement",
        tests: &[(
            "ra",
            "instances_that_autoconfigure_get_their_address_and_default_route_from_the_router",
        )],
    },
    Mutant {
        name: "ra_no_final",
        fault: "a subnet that stops being advertised gets no final advertisement: instances \
                keep the router as their default for its whole lifetime",
        tests: &[(
            "ra",
            "instances_that_autoconfigure_get_their_address_and_default_route_from_the_router",
        )],
    },
    Mutant {
        name: "ra_stateful_autonomous",
        fault: "a dhcpv6-stateful subnet's prefix is advertised autonomous: instances \
                autoconfigure addresses DHCPv6 should assign",
        tests: &[("lib", "ra::tests::each_mode_advertises_its_flags_and_options")],
    },
    Mutant {
        name: "ra_standby_advertises",
        fault: "an HA router's standby host advertises its subnets too: instances take a \
                router that holds none of the router's addresses as their default",
        tests: &[(
            "ha",
            "a_dual_stack_router_fails_over_with_neighbour_advertisements",
        )],
    },
    Mutant {
        name: "api_group_ignored",
        fault: "the daemon's peer check ignores --api-group: its members reach the socket and \
                are refused all the same",
        tests: &[(
            "safety",
            "members_of_the_api_group_change_routers_through_the_daemon_and_others_cannot",
        )],
    },
    Mutant {
        name: "ha_role_always_active",
        fault: "`show` says a followed HA router is active on every host, the standby too",
        tests: &[(
            "follow",
            "an_ha_router_moved_by_keepalived_is_followed_to_its_new_master",
        )],
    },
    Mutant {
        name: "kernel_policy_events_ignored",
        fault: "the daemon does not read a namespace again when its forwarding sysctls or policy rules change",
        tests: &[(
            "follow",
            "forwarding_switches_blackholes_and_policy_rules_are_followed",
        )],
    },
    Mutant {
        name: "guard_off",
        fault: "the controller never guards a router whose namespace holds foreign netfilter rules",
        tests: &[(
            "guard",
            "foreign_rules_are_never_bypassed_and_accepted_flows_are_carried",
        )],
    },
    Mutant {
        name: "guard_no_evidence",
        fault: "under foreign rules a flow conntrack holds is copied whether or not the kernel forwarded it under the rules in force",
        tests: &[(
            "guard",
            "foreign_rules_are_never_bypassed_and_accepted_flows_are_carried",
        )],
    },
    Mutant {
        name: "guard_keeps_copies",
        fault: "a change of the namespace's netfilter rules leaves the flow copies in use",
        tests: &[(
            "guard",
            "foreign_rules_are_never_bypassed_and_accepted_flows_are_carried",
        )],
    },
    Mutant {
        name: "guard_strict_tcp_copied",
        fault: "under foreign rules TCP flows are copied although conntrack is strict (segments coming back to the kernel fall out of its window)",
        tests: &[(
            "follow",
            "a_router_the_l3_agent_built_is_accelerated_with_only_follow",
        )],
    },
    Mutant {
        name: "follow_route_events_ignored",
        fault: "a followed router's routes are not read again when the kernel's routes change",
        tests: &[(
            "follow",
            "a_router_the_l3_agent_built_is_accelerated_with_only_follow",
        )],
    },
    Mutant {
        name: "pass_all",
        fault: "the program returns PASS for everything",
        tests: &[
            ("packet", "forwards_to_a_connected_host_byte_exact"),
            (
                "netns",
                "tc_forwards_ping_and_tcp_with_kernel_forwarding_off",
            ),
        ],
    },
    Mutant {
        name: "no_ttl_decrement",
        fault: "TTL and hop limit are not decremented",
        tests: &[
            ("packet", "forwards_to_a_connected_host_byte_exact"),
            ("packet", "forwards_ipv6_to_a_connected_host_byte_exact"),
        ],
    },
    Mutant {
        name: "checksum_byte_order",
        fault: "the IPv4 checksum update is written in the wrong byte order",
        tests: &[("packet", "incremental_checksum_equals_recomputation")],
    },
    Mutant {
        name: "src_mac_unchanged",
        fault: "the source MAC is left unchanged",
        tests: &[
            ("packet", "forwards_to_a_connected_host_byte_exact"),
            (
                "netns",
                "forwarded_frame_has_ttl_minus_one_and_egress_source_mac",
            ),
        ],
    },
    Mutant {
        name: "empty_maps_on_restart",
        fault:
            "a restarted daemon starts with empty neighbour and device maps, filled a second later",
        tests: &[("netns", "a_killed_and_restarted_daemon_loses_no_packet")],
    },
    Mutant {
        name: "down_keeps_tx_slot",
        fault: "a device that is down keeps its redirect slot",
        tests: &[(
            "netns",
            "a_device_going_down_or_changing_mtu_leaves_the_fast_path_in_line",
        )],
    },
    Mutant {
        name: "break_before_make",
        fault: "route table entries are emptied before they are rewritten (break-before-make)",
        tests: &[
            ("packet", "route_changes_are_never_seen_half_done"),
            (
                "churn",
                "frames_reach_their_nexthops_or_the_kernel_under_churn",
            ),
        ],
    },
    Mutant {
        name: "write_over_break_before_make",
        fault: "the in-place writer of a table read back from the maps (`write_over`, what \
                apply and the daemon use below 4 096 routes) empties the entries it changes \
                before writing them",
        tests: &[("packet", "set_routes_rewrites_are_never_seen_half_done")],
    },
    Mutant {
        name: "device_mac_change_ignored",
        fault: "the daemon keeps the MAC a router device had at apply after the device's MAC \
                changed (frames to the new MAC go to the kernel, forwarded frames carry the old \
                one as their source)",
        tests: &[("netns", "a_changed_device_mac_or_address_is_followed")],
    },
    Mutant {
        name: "address_events_ignored",
        fault: "the daemon does not follow address events: an address added to a qr- device \
                after apply is routed as a neighbour's, a removed one stays the router's",
        tests: &[
            ("netns", "a_changed_device_mac_or_address_is_followed"),
            (
                "follow",
                "a_router_the_l3_agent_built_is_accelerated_with_only_follow",
            ),
        ],
    },
    Mutant {
        name: "v6_route_removal_kept",
        fault: "a deleted IPv6 route (route batch, the daemon's table) stays in the fast path",
        tests: &[(
            "netns",
            "an_ipv6_route_batch_reaches_the_kernel_and_the_fast_path",
        )],
    },
    Mutant {
        name: "rollback_deletes_previous_namespace",
        fault: "a router whose re-apply fails is rolled back past its previous state: the \
                namespace an earlier apply made is deleted with everything in it",
        tests: &[(
            "safety",
            "a_failing_router_rolls_back_alone_in_a_multi_router_apply",
        )],
    },
    Mutant {
        name: "fence_never_lifted",
        fault: "a router fenced while its host was cut off keeps the fence after it is applied \
                again: the host can never answer for its addresses again",
        tests: &[(
            "ha",
            "a_host_cut_off_from_etcd_is_fenced_and_returns_as_standby",
        )],
    },
    Mutant {
        name: "etcd_client_cert_dropped",
        fault: "the client certificate given with --etcd-cert/--etcd-key is not presented: \
                an etcd with --client-cert-auth refuses agents and the CLI",
        tests: &[(
            "etcd_auth",
            "agents_and_the_cli_work_with_their_credentials_and_nothing_else_does",
        )],
    },
    Mutant {
        name: "interrupted_apply_forgotten",
        fault: "an apply killed part-way is never rolled back: its undo journal is not read by \
                the next apply or destroy (what it created leaks, adopted devices stay inside)",
        tests: &[(
            "safety",
            "an_apply_killed_at_any_step_is_rolled_back_by_the_next_destroy_or_apply",
        )],
    },
    Mutant {
        name: "home_addresses_lost",
        fault: "an adopted device moved back to the caller's namespace comes back without the \
                addresses it had there (the kernel drops them on a move)",
        tests: &[(
            "safety",
            "an_apply_killed_at_any_step_is_rolled_back_by_the_next_destroy_or_apply",
        )],
    },
    Mutant {
        name: "renewals_share_the_session_thread",
        fault: "the lease renewals run on the session's thread: a session held up longer than \
                the lease (a full read, a large parse) lets the lease expire and the host is \
                fenced though alive",
        tests: &[("ha", "the_lease_is_renewed_while_the_agent_is_busy")],
    },
    Mutant {
        name: "host_limits_ignored",
        fault: "a host applies every router etcd schedules to it, whatever its --max-routers \
                and --max-routes say",
        tests: &[("ha", "routers_beyond_a_hosts_limit_are_refused_with_a_status")],
    },
    Mutant {
        name: "neigh_change_ignored",
        fault: "the daemon keeps the old MAC of a neighbour whose MAC changed",
        tests: &[
            (
                "churn",
                "frames_reach_their_nexthops_or_the_kernel_under_churn",
            ),
            ("netns", "a_changed_neighbour_mac_is_followed"),
        ],
    },
    Mutant {
        name: "ecmp_ignores_ports",
        fault: "the ECMP hash ignores ports",
        tests: &[("packet", "ecmp_spreads_flows_and_keeps_each_on_one_nexthop")],
    },
    Mutant {
        name: "wrong_pass_reason",
        fault: "a frame without a neighbour is counted as no_route",
        tests: &[
            (
                "packet",
                "every_pass_reason_is_counted_and_leaves_the_frame_untouched",
            ),
            ("packet", "fuzzed_frames_keep_every_property"),
        ],
    },
    Mutant {
        name: "no_padding_trim",
        fault: "Ethernet padding is not trimmed from forwarded frames",
        tests: &[
            ("packet", "ethernet_padding_is_trimmed_when_forwarding"),
            ("parity", "the_fast_path_delivers_what_the_kernel_delivers"),
        ],
    },
    Mutant {
        name: "gso_whole_length",
        fault: "tc measures a GSO packet by its whole length against the MTU, not by its segments",
        tests: &[
            ("packet", "gso_packets_are_measured_by_their_segments"),
            (
                "netns",
                "at_kernel_defaults_ping_and_tcp_cross_in_the_fast_path_both_ways",
            ),
        ],
    },
    Mutant {
        name: "l4_unverified",
        fault: "forced XDP on a device fed by skbs does not verify TCP/UDP checksums",
        tests: &[
            (
                "netns",
                "forced_xdp_on_veths_is_never_worse_than_the_kernel",
            ),
            ("packet", "fuzzed_frames_keep_every_property"),
        ],
    },
    Mutant {
        name: "auto_picks_xdp_on_veth",
        fault: "auto picks XDP for veths",
        tests: &[(
            "netns",
            "at_kernel_defaults_ping_and_tcp_cross_in_the_fast_path_both_ways",
        )],
    },
    Mutant {
        name: "ndo_xmit_ignored",
        fault: "a device that cannot take XDP-redirected frames keeps its XDP slot",
        tests: &[(
            "netns",
            "forced_xdp_on_veths_is_never_worse_than_the_kernel",
        )],
    },
    Mutant {
        name: "late_xmit_removal",
        fault: "a device that stops taking XDP frames leaves the devmap only at the next resync",
        tests: &[(
            "netns",
            "forced_xdp_on_veths_is_never_worse_than_the_kernel",
        )],
    },
    Mutant {
        name: "keeps_deleted_namespace",
        fault:
            "the daemon keeps holding (and reporting) a router namespace deleted without destroy",
        tests: &[(
            "netns",
            "a_deleted_namespace_is_released_and_the_next_apply_starts_clean",
        )],
    },
];

/// Builds router-ctl and the test binaries in the `mutants` profile with `mutant` (None: the
/// unmutated build); returns the router-ctl binary.
fn build(root: &Path, mutant: Option<&str>) -> Result<std::path::PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--profile", "mutants", "-p", "router-ctl"]);
    cmd.args(["-p", "tests", "--bins", "--tests"]);
    match mutant {
        Some(m) => cmd.env("ROUTER_XDP_MUTANT", m),
        None => cmd.env_remove("ROUTER_XDP_MUTANT"),
    };
    let out = cmd.output().context("cannot run cargo build")?;
    if !out.status.success() {
        bail!(
            "building mutant {mutant:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(root.join("target/mutants/router-ctl"))
}

/// How one test ran against a build.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Passed,
    /// The test itself failed: it ran past its set-up and an assertion of its own failed.
    Failed,
    /// The test panicked in its set-up (`tests::in_setup`: a fixture, a program the verifier
    /// refused at load): it never got to what it claims, so this proves nothing.
    SetUpFailed,
    /// The test did not run or did not report (a build error, a crash, a filter that selects
    /// nothing or more than one test).
    NotRun,
    /// The project's own code panicked (router-ctl, router-common): the fault crashed the code
    /// the test calls rather than showing as the behaviour the test checks.
    CodePanicked,
}

/// What the output of `cargo test -- FILTER --exact` says about test FILTER.
fn outcome(filter: &str, success: bool, text: &str) -> Outcome {
    let ran_one = text.lines().any(|l| l.trim() == "running 1 test");
    let line = |verdict: &str| {
        text.lines()
            .any(|l| l.trim() == format!("test {filter} ... {verdict}"))
    };
    if !ran_one {
        return Outcome::NotRun;
    }
    if line("ok") {
        return if success {
            Outcome::Passed
        } else {
            Outcome::NotRun
        };
    }
    if !line("FAILED") {
        return Outcome::NotRun;
    }
    if text.contains("set-up failed:") {
        Outcome::SetUpFailed
    } else if text.lines().any(|l| {
        l.contains("panicked at router-ctl/src/") || l.contains("panicked at router-common/src/")
    }) {
        Outcome::CodePanicked
    } else {
        Outcome::Failed
    }
}

/// Runs one test of one test binary against the build.
fn run_test(
    ctl: &Path,
    mutant: Option<&str>,
    binary: &str,
    filter: &str,
    log: &Path,
) -> Result<Outcome> {
    // A daemon of the previous build must not serve this one's routers.
    let _ = Command::new("pkill")
        .args(["-9", "-f", "router-ct[l] run"])
        .status();
    let mut cmd = Command::new("cargo");
    // "lib": router-ctl's own unit tests.
    if binary == "lib" {
        cmd.args(["test", "--profile", "mutants", "-p", "router-ctl", "--lib"]);
    } else {
        cmd.args([
            "test",
            "--profile",
            "mutants",
            "-p",
            "tests",
            "--test",
            binary,
        ]);
    }
    cmd.args(["--", filter, "--exact", "--test-threads", "1"])
        .env("ROUTER_CTL", ctl)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match mutant {
        Some(m) => cmd.env("ROUTER_XDP_MUTANT", m),
        None => cmd.env_remove("ROUTER_XDP_MUTANT"),
    };
    let out = cmd.output().context("cannot run cargo test")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(log, &text)?;
    if out.status.success() && !text.contains("running 1 test") {
        bail!("`{binary} {filter}` selected no single test: fix the mutant's test list");
    }
    Ok(match outcome(filter, out.status.success(), &text) {
        // router-ctl's unit tests live in router-ctl/src: their own assertions panic there.
        Outcome::CodePanicked if binary == "lib" => Outcome::Failed,
        o => o,
    })
}

/// Runs the mutants (all, or those named in `only`); true when every one was killed. The last
/// line printed is `mutants: N killed, M survived`.
pub fn run(root: &Path, only: &[String], all_tests: bool) -> Result<bool> {
    let t0 = Instant::now();
    let chosen: Vec<&Mutant> = MUTANTS
        .iter()
        .filter(|m| only.is_empty() || only.iter().any(|o| o == m.name))
        .collect();
    if chosen.is_empty() {
        let names: Vec<_> = MUTANTS.iter().map(|m| m.name).collect();
        bail!(
            "no mutant named {only:?}; the mutants are {}",
            names.join(", ")
        );
    }
    let logs = root.join("target/mutants/logs");
    std::fs::create_dir_all(&logs)?;

    eprintln!("mutants: the unmutated build must pass every test the mutants use");
    let ctl = build(root, None)?;
    let mut tests: Vec<(&str, &str)> = chosen
        .iter()
        .flat_map(|m| m.tests.iter().copied())
        .collect();
    tests.sort();
    tests.dedup();
    for (binary, filter) in &tests {
        let log = logs.join(format!("baseline-{binary}-{filter}.log"));
        if run_test(&ctl, None, binary, filter, &log)? != Outcome::Passed {
            bail!(
                "`{binary} {filter}` fails without any mutant (see {}): fix that first",
                log.display()
            );
        }
    }

    let (mut killed, mut survived) = (Vec::new(), Vec::new());
    for m in &chosen {
        let tm = Instant::now();
        let ctl = build(root, Some(m.name))?;
        let (mut by, mut void) = (Vec::new(), Vec::new());
        for (binary, filter) in m.tests {
            let log = logs.join(format!("{}-{binary}-{filter}.log", m.name));
            // Only the named test failing on its own claim kills the mutant; a set-up failure
            // or a test that did not run is reported, and proves nothing.
            match run_test(&ctl, Some(m.name), binary, filter, &log)? {
                Outcome::Passed => {}
                Outcome::Failed => {
                    by.push(format!("{binary}::{filter}"));
                    if !all_tests {
                        break;
                    }
                }
                o => {
                    eprintln!(
                        "mutant {}: `{binary} {filter}`: {o:?}, not a kill (see {})",
                        m.name,
                        log.display()
                    );
                    void.push(format!("{binary}::{filter} ({o:?})"));
                }
            }
        }
        let secs = tm.elapsed().as_secs();
        if by.is_empty() {
            let note = if void.is_empty() {
                String::new()
            } else {
                format!("; not counted: {}", void.join(", "))
            };
            println!("SURVIVED {:<22} {}{note} ({secs} s)", m.name, m.fault);
            survived.push(m.name);
        } else {
            println!(
                "killed   {:<22} {} — by {} ({secs} s)",
                m.name,
                m.fault,
                by.join(", ")
            );
            killed.push(m.name);
        }
    }
    let _ = Command::new("pkill")
        .args(["-9", "-f", "router-ct[l] run"])
        .status();
    eprintln!(
        "mutants: took {} s; logs in {}",
        t0.elapsed().as_secs(),
        logs.display()
    );
    println!(
        "mutants: {} killed, {} survived",
        killed.len(),
        survived.len()
    );
    Ok(survived.is_empty())
}

#[cfg(test)]
mod tests {
    use super::{outcome, Outcome};

    #[test]
    fn only_the_named_test_failing_past_its_set_up_is_a_kill() {
        let head = "running 1 test\n";
        let f = "t_x";
        assert_eq!(
            outcome(f, true, &format!("{head}test t_x ... ok\n")),
            Outcome::Passed
        );
        assert_eq!(
            outcome(
                f,
                false,
                &format!("{head}test t_x ... FAILED\npanicked at x: boom\n")
            ),
            Outcome::Failed
        );
        assert_eq!(
            outcome(
                f,
                false,
                &format!("{head}test t_x ... FAILED\npanicked: set-up failed: apply failed\n")
            ),
            Outcome::SetUpFailed
        );
        assert_eq!(
            outcome(
                f,
                false,
                &format!("{head}test t_x ... FAILED\nthread 'w' panicked at router-ctl/src/datapath.rs:549:20:\n")
            ),
            Outcome::CodePanicked
        );
        // A build error: no test ran.
        assert_eq!(
            outcome(f, false, "error[E0425]: cannot find value"),
            Outcome::NotRun
        );
        // Another test's line, or a crash before the verdict.
        assert_eq!(
            outcome(f, false, &format!("{head}test t_y ... FAILED\n")),
            Outcome::NotRun
        );
        assert_eq!(
            outcome(f, false, &format!("{head}error: test failed, SIGSEGV\n")),
            Outcome::NotRun
        );
    }
}
