'use strict';
// Reference server for ehlo's benchmark (bench/run.py): nodemailer's
// smtp-server (pinned in package.json) with an onData that discards.
//
//   node server.js --listen 127.0.0.1:PORT [--no-greeting-delay]
//
// What is set, and why:
// - disabledCommands ['AUTH', 'STARTTLS'] and authOptional: no
//   authentication, no TLS (ehlo runs with --no-tls; smtp-source speaks plain
//   SMTP). With STARTTLS disabled no certificate is loaded.
// - size left unset: no SIZE limit (W3 sends 10 MiB messages).
// - disableReverseLookup: no PTR lookup per connection (ehlo runs with
//   --no-reverse-dns for the same workloads).
// - logger false: no per-connection logging.
// - maxClients unset (unlimited), socketTimeout 10 minutes: W4 holds
//   thousands of idle connections.
// - Greeting delay: smtp-server 3.21.6 waits a fixed 100 ms before its 220
//   banner ("detecting early talkers", SMTPConnection.init()); there is NO
//   option to turn it off. By default it is kept, as shipped. With
//   --no-greeting-delay this script replaces SMTPConnection.prototype.init
//   by the same code without the timer (bench/run.py --node-no-greeting-delay).
// - onData drains the stream and answers 250 once it has ended.

const { SMTPServer } = require('smtp-server');

function parseArgs(argv) {
    const args = { listen: '127.0.0.1:2525', noGreetingDelay: false };
    for (let i = 0; i < argv.length; i++) {
        if (argv[i] === '--listen') {
            args.listen = argv[++i];
        } else if (argv[i] === '--no-greeting-delay') {
            args.noGreetingDelay = true;
        } else {
            console.error(`server.js: unknown argument ${argv[i]}`);
            process.exit(2);
        }
    }
    const at = args.listen.lastIndexOf(':');
    args.host = args.listen.slice(0, at);
    args.port = Number(args.listen.slice(at + 1));
    return args;
}

const args = parseArgs(process.argv.slice(2));

if (args.noGreetingDelay) {
    const { SMTPConnection } = require('smtp-server/lib/smtp-connection.js');
    // The shipped init() without its 100 ms setTimeout around connectionReady().
    SMTPConnection.prototype.init = function init() {
        this._setListeners(() => {
            const max = this._server.options.maxClients;
            if (max && this._server.connections.size > max) {
                return this.send(421, this.name + ' Too many connected clients, try again in a moment', false);
            }
            this.connectionReady();
        });
    };
}

const server = new SMTPServer({
    name: 'localhost',
    banner: 'node smtp-server (bench)',
    disabledCommands: ['AUTH', 'STARTTLS'],
    authOptional: true,
    hideSTARTTLS: true,
    disableReverseLookup: true,
    logger: false,
    socketTimeout: 10 * 60 * 1000,
    onData(stream, session, callback) {
        stream.on('data', () => {});
        stream.on('end', () => callback(null, 'OK: discarded'));
        stream.resume();
    },
});

server.on('error', (err) => {
    console.error(`server.js: ${err.message}`);
});

server.listen(args.port, args.host, 4096, () => {
    console.error(
        `node smtp-server ${require('smtp-server/package.json').version} ready on ` +
            `${args.host}:${args.port} (node ${process.version}, greeting delay ` +
            `${args.noGreetingDelay ? 'removed' : '100 ms as shipped'})`,
    );
});

for (const signal of ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => process.exit(0));
}
