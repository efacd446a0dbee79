"""Builds a legacy router with Neutron's own L3 agent code, for the tests.

Neutron's `L3NATAgentWithStateReport` (neutron/agent/l3/agent.py) is started as
`neutron-l3-agent` starts it (`init_host`), with its RPC to neutron-server
faked as Neutron's functional tests fake it, and handed a router dict as the
server would send it over RPC; `_process_added_router` then does what the agent
does for a new router: the namespace's sysctls (namespaces.py), the addresses
of the `qr-`/`qg-` ports, the default and extra routes, the floating IPs'
addresses, and every iptables and ip6tables rule (router_info.py, through
iptables_manager.py's iptables-restore), then the metadata proxy's rules
(metadata/driver.py: apply_metadata_nat_rules), as on the router's creation.

What is not Neutron's here:
- the ports are plugged by the caller (the interface driver is Neutron's
  NullDriver, bringing the device up as the real drivers' plug does), as the
  L2 agent's switch (Open vSwitch, veths) is the test's;
- the namespace's name is the caller's (`qrouter-<id>` with the test's id);
- privileged calls run in this process (we are root), as in Neutron's tests,
  instead of through privsep's daemon;
- no haproxy (metadata proxy) is started: only its rules are written.

An HA router ("ha" in the spec) is Neutron's HaRouter: the agent plugs its
`ha-` port, writes keepalived's configuration (ha_router.py, keepalived.py)
and starts keepalived and neutron-keepalived-state-change in the namespace,
as on a network node. With "serve" the agent then stays up (serving the
state-change daemon's notifications, its process monitor watching keepalived)
until its stdin closes, and removes the router as it does on a router's
deletion (keepalived and the monitor stopped) before it exits.

Usage: python l3_agent.py STATE_DIR < router.json, where router.json is one
line:
  {"namespace": "qrouter-...",
   "gateway": {"device": "qg-...", "ip": "192.168.1.10/24", "gateway_ip": "192.168.1.1"},
   "internal_ports": [{"device": "qr-...", "cidr": "172.16.100.1/24"}, ...],
   "floating_ips": [{"fixed_ip_address": "172.16.101.3", "floating_ip_address": "192.168.1.20"}],
   "routes": [{"destination": "10.10.0.0/16", "nexthop": "172.16.101.254"}],
   "ha": {"device": "ha-...", "cidr": "169.254.192.1/18", "vr_id": 1},
   "serve": true}
Device names are `qr-`/`qg-` and the port id's first 11 characters, as
Neutron names them: the port id is taken from the device name.
"""
import json
import os
import sys
import uuid

# iptables_manager names its chains after the program (binary_name, read at
# import): the agent's are `neutron-l3-agent-*`.
sys.argv[0] = 'neutron-l3-agent'

import warnings  # noqa: E402
warnings.filterwarnings('ignore')

from unittest import mock  # noqa: E402

import netaddr  # noqa: E402
from neutron_lib import constants as lib_const  # noqa: E402
from oslo_concurrency import lockutils  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_log import log as logging  # noqa: E402
from oslo_privsep import priv_context  # noqa: E402

from neutron.agent import l3_agent as l3_agent_main  # noqa: E402
from neutron.agent.l3 import agent as l3_agent  # noqa: E402
from neutron.agent.l3 import ha  # noqa: E402
from neutron.agent.l3 import namespaces  # noqa: E402
from neutron.agent.linux import interface  # noqa: E402
from neutron.agent.linux import ip_lib  # noqa: E402
from neutron.agent.metadata import driver as metadata_driver  # noqa: E402
import neutron.privileged  # noqa: E402


class PluggedDriver(interface.NullDriver):
    """Neutron's NullDriver (the device exists already), leaving the device up
    as the OVS and linuxbridge drivers' plug does."""

    def plug(self, network_id, port_id, device_name, mac_address,
             bridge=None, namespace=None, prefix=None, mtu=None):
        super().plug(network_id, port_id, device_name, mac_address,
                     bridge=bridge, namespace=namespace, prefix=prefix,
                     mtu=mtu)
        ip_lib.IPDevice(device_name, namespace=namespace).link.set_up()


def configure(state_dir):
    l3_agent_main.register_opts(cfg.CONF)
    logging.register_options(cfg.CONF)
    cfg.CONF([], project='neutron', default_config_files=[])
    # The log in the state directory: stdout says when the router is built.
    cfg.CONF.set_override('log_file', os.path.join(state_dir, 'agent.log'))
    logging.setup(cfg.CONF, 'neutron-l3-agent')
    os.makedirs(os.path.join(state_dir, 'locks'), exist_ok=True)
    lockutils.set_defaults(lock_path=os.path.join(state_dir, 'locks'))
    cfg.CONF.set_override('state_path', state_dir)
    cfg.CONF.set_override('external_pids', os.path.join(state_dir, 'pids'))
    cfg.CONF.set_override('interface_driver', '__main__.PluggedDriver')
    cfg.CONF.set_override('enable_metadata_proxy', False)
    # We are root: the processes the agent starts (keepalived, the
    # state-change monitor) need no root helper; the monitor is the venv's.
    cfg.CONF.set_override('root_helper', '', 'AGENT')
    os.environ['PATH'] = '%s:%s' % (os.path.dirname(sys.executable),
                                    os.environ.get('PATH', ''))
    for name in dir(neutron.privileged):
        ctx = getattr(neutron.privileged, name)
        if isinstance(ctx, priv_context.PrivContext):
            ctx.set_client_mode(False)


def port(device, prefix, cidr, owner, gateway_ip=None):
    """A router port as neutron-server sends it (cf. Neutron's
    tests/common/l3_test_common.py: prepare_router_data)."""
    if not device.startswith(prefix) or len(device) > 14:
        raise SystemExit('device %r: %r and at most 11 characters of port id'
                         % (device, prefix))
    net = netaddr.IPNetwork(cidr)
    subnet_id = str(uuid.uuid5(uuid.NAMESPACE_URL, 'subnet-%s' % net.cidr))
    return {
        'id': device[len(prefix):],
        'network_id': str(uuid.uuid5(uuid.NAMESPACE_URL, 'net-' + device)),
        'admin_state_up': True,
        'mac_address': None,
        'mtu': 1500,
        'device_owner': owner,
        'fixed_ips': [{'ip_address': str(net.ip), 'prefixlen': net.prefixlen,
                       'subnet_id': subnet_id}],
        'subnets': [{'id': subnet_id, 'cidr': str(net.cidr),
                     'gateway_ip': gateway_ip or str(net.ip),
                     'ipv6_ra_mode': None, 'ipv6_address_mode': None}],
        'extra_subnets': [],
        'address_scopes': {'4': None, '6': None},
    }


def router_dict(spec):
    router_id = str(uuid.uuid5(uuid.NAMESPACE_URL, spec['namespace']))
    fips = []
    for f in spec.get('floating_ips', []):
        fips.append({
            'id': str(uuid.uuid5(uuid.NAMESPACE_URL,
                                 'fip-' + f['floating_ip_address'])),
            'port_id': str(uuid.uuid5(uuid.NAMESPACE_URL,
                                      'port-' + f['fixed_ip_address'])),
            'fixed_ip_address': f['fixed_ip_address'],
            'floating_ip_address': f['floating_ip_address'],
            'fixed_ip_address_scope': None,
            'status': lib_const.FLOATINGIP_STATUS_DOWN,
        })
    gw = spec.get('gateway')
    ha_spec = spec.get('ha')
    extra = {}
    if ha_spec:
        ha_port = port(ha_spec['device'], 'ha-', ha_spec['cidr'],
                       lib_const.DEVICE_OWNER_ROUTER_HA_INTF)
        ha_port['status'] = lib_const.PORT_STATUS_ACTIVE
        extra = {lib_const.HA_INTERFACE_KEY: ha_port,
                 'ha_vr_id': ha_spec['vr_id']}
    return dict(extra, **{
        'id': router_id,
        'distributed': False,
        'ha': bool(ha_spec),
        'admin_state_up': True,
        lib_const.INTERFACE_KEY: [
            port(p['device'], namespaces.INTERNAL_DEV_PREFIX, p['cidr'],
                 lib_const.DEVICE_OWNER_ROUTER_INTF)
            for p in spec.get('internal_ports', [])],
        lib_const.FLOATINGIP_KEY: fips,
        'routes': spec.get('routes', []),
        'gw_port': gw and port(gw['device'], namespaces.EXTERNAL_DEV_PREFIX,
                               gw['ip'], lib_const.DEVICE_OWNER_ROUTER_GW,
                               gateway_ip=gw.get('gateway_ip')),
        'external_gateway_info': {'qos_policy_id': None} if gw else None,
        'enable_snat': spec.get('enable_snat', True),
        '_pf_floatingips': [],
    })


def main():
    state_dir = sys.argv[1]
    spec = json.loads(sys.stdin.readline())
    configure(state_dir)
    router = router_dict(spec)
    # neutron-server, as Neutron's functional tests fake it.
    plugin = mock.patch('neutron.agent.l3.agent.L3PluginApi').start()
    plugin.return_value.get_host_ha_router_count.return_value = 0
    mock.patch('neutron.agent.rpc.PluginReportStateAPI').start()
    mock.patch('neutron.agent.rpc.create_consumers').start()
    if not spec.get('serve'):
        mock.patch.object(
            ha.AgentMixin, '_start_keepalived_notifications_server').start()
    mock.patch.object(namespaces.RouterNamespace, '_get_ns_name',
                      classmethod(lambda cls, _id: spec['namespace'])).start()
    agent = l3_agent.L3NATAgentWithStateReport('router-xdp-tests', cfg.CONF)
    agent.init_host()
    agent._process_added_router(router)
    ri = agent.router_info[router['id']]
    proxy = mock.Mock(metadata_port=cfg.CONF.metadata_port,
                      metadata_access_mark=cfg.CONF.metadata_access_mark)
    metadata_driver.apply_metadata_nat_rules(ri, proxy)
    if spec.get('serve'):
        ready = {}
        if router['ha']:
            ready['keepalived_pid_file'] = (
                ri.keepalived_manager.get_process().get_pid_file_name())
        print(json.dumps(ready), flush=True)
        sys.stdin.read()
        agent._safe_router_removed(router['id'])


if __name__ == '__main__':
    rc = 1
    try:
        main()
        rc = 0
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # The agent leaves threads behind (its process monitor, its pool).
        os._exit(rc)
