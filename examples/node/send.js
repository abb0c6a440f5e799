'use strict';
// Send one mail through mailsvc from Node.js, loading the contract straight from the .proto files
// (no generated code). Environment:
//   MAILSVC_SERVER  host:port of the server (default 127.0.0.1:50051)
//   MAILSVC_TOKEN   bearer token of a caller allowed to send (e.g. `mailsvc token --roles admin`)
//   MAIL_TO         recipient (default someone@example.com)
//   MAILSVC_TLS_CA  optional: use TLS and trust the CA certificates in this PEM file
// Prints the SendMailResponse as JSON and exits 0; on failure prints `CODE_NAME: message` on
// stderr and exits 1 (2 when the environment is incomplete).

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const DEADLINE_MS = 30_000;

function loadMailService() {
  // The file is named relative to includeDirs, as protoc would (-I protos). Its import of
  // google/protobuf/struct.proto needs no include dir: proto-loader (through protobufjs)
  // bundles the well-known types.
  const definition = protoLoader.loadSync('mailsvc/v1/mail.proto', {
    includeDirs: [PROTOS],
    // keepCase: false (the default) turns field names into lowerCamelCase (idempotencyKey,
    // messageId), the same names as protobuf JSON and `mailsvc send` output.
    keepCase: false,
    longs: String,
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).mailsvc.v1.MailService;
}

function credentials() {
  const ca = process.env.MAILSVC_TLS_CA;
  return ca ? grpc.credentials.createSsl(fs.readFileSync(ca)) : grpc.credentials.createInsecure();
}

function main() {
  const server = process.env.MAILSVC_SERVER || '127.0.0.1:50051';
  const token = (process.env.MAILSVC_TOKEN || '').trim();
  const to = process.env.MAIL_TO || 'someone@example.com';
  if (!token) {
    console.error('MAILSVC_TOKEN is not set: get one with `mailsvc token --roles admin`');
    process.exitCode = 2;
    return;
  }

  const MailService = loadMailService();
  const client = new MailService(server, credentials());
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  const request = {
    to: [to],
    subject: 'Hello from Node.js',
    text: 'This mail was sent by examples/node/send.js through mailsvc.',
  };

  client.SendMail(request, metadata, { deadline: Date.now() + DEADLINE_MS }, (err, response) => {
    client.close();
    if (err) {
      // err.details is the server's message; field violations travel in the
      // grpc-status-details-bin trailer (google.rpc.Status), not decoded here.
      console.error(`${grpc.status[err.code] || err.code}: ${err.details}`);
      process.exitCode = 1;
      return;
    }
    console.log(JSON.stringify(response, null, 2));
  });
}

main();
