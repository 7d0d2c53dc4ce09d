# Helpers shared by host.nix and guest.nix: systemd credential-name rules,
# escaping for unit files, and a small TOML renderer.
#
# The TOML renderer is written with nixpkgs `lib` alone (no `pkgs.formats.toml`,
# which runs remarshal at build time) so that the exact text the agents read is
# computed at evaluation time and can be checked against the real binaries by
# tests/nix/run.sh without building anything.
{ lib }:

let
  inherit (lib)
    concatMapStringsSep concatStrings mapAttrsToList filterAttrs
    hasInfix stringLength optionalString isDerivation;
in
rec {
  credentialNameRules =
    "printable ASCII without spaces, no \"/\" or \":\", not \".\" or \"..\", 1-255 characters";

  # systemd's credential_name_valid() (filename_is_valid() && fdname_is_valid()),
  # minus the space, which vmcred refuses everywhere (proto/src/rules.rs) because
  # unit-file lists split on it. Returns null when valid, else the reason.
  credentialNameProblem = n:
    if !builtins.isString n then "is not a string"
    else if n == "" then "is empty"
    else if stringLength n > 255 then "is ${toString (stringLength n)} characters long (at most 255)"
    else if n == "." || n == ".." then "is \"${n}\""
    else if lib.hasInfix " " n then "contains a space"
    else if builtins.match "[!-~]*" n == null then "contains a character that is not printable ASCII"
    else if hasInfix "/" n then "contains \"/\""
    else if hasInfix ":" n then "contains \":\""
    else null;

  isValidCredentialName = n: credentialNameProblem n == null;

  # The guest agent's own rules (guest-agent/src/config.rs), so that what
  # evaluates is what the agent accepts at boot (and the reverse):
  # - a unit name: 1-255 bytes, no leading "-", no "/", no white space or
  #   control characters (validate_unit);
  unitNameType = lib.types.addCheck
    (lib.types.strMatching "[^-/[:space:][:cntrl:]][^/[:space:][:cntrl:]]*")
    (s: stringLength s <= 255) // {
      description = "systemd unit name (1-255 bytes, no leading \"-\", no \"/\", no white space)";
    };
  # - a mode: octal, read bits only, owner-readable (parse_mode): 0400,
  #   0440, 0404, 0444, with or without the leading 0 or "0o";
  modeType = lib.types.strMatching "(0o)?0?4[04][04]" // {
    description = "credential file mode: \"0400\", \"0440\", \"0404\" or \"0444\" (read bits only, owner-readable)";
  };
  # - a duration: humantime, every number with its unit ("30s", "1m 30s",
  #   "500ms"); a bare number is refused by the agent, so here too.
  durationType = lib.types.strMatching
    "[0-9]+(ms|s|sec|m|min|h|d)( ?[0-9]+(ms|s|sec|m|min|h|d))*" // {
      description = "duration with a unit, e.g. \"30s\", \"1m 30s\", \"500ms\"";
    };

  # Unit-file values undergo specifier expansion (%) and C-style unescaping (\).
  escapeUnitValue = s: builtins.replaceStrings [ "%" "\\" ] [ "%%" "\\\\" ] s;

  # --- TOML ---------------------------------------------------------------
  tomlKey = k:
    if builtins.match "[A-Za-z0-9_-]+" k != null then k else builtins.toJSON k;

  tomlValue = v:
    if builtins.isBool v then (if v then "true" else "false")
    else if builtins.isInt v then toString v
    else if builtins.isFloat v then toString v
    # JSON string escapes (\" \\ \n \t \uXXXX) are valid TOML basic-string escapes.
    else if builtins.isString v then builtins.toJSON v
    else if builtins.isList v then "[" + concatMapStringsSep ", " tomlValue v + "]"
    else if builtins.isPath v then
      throw "vmcred: a Nix path literal cannot be rendered into the TOML config: it would be copied into the world-readable Nix store. Write the path as a string."
    else if builtins.isAttrs v && !(isDerivation v) then
      "{" + concatMapStringsSep ", " (k: "${tomlKey k} = ${tomlValue v.${k}}")
        (builtins.attrNames (filterAttrs (_: x: x != null) v)) + "}"
    else throw "vmcred: cannot render a ${builtins.typeOf v} as TOML";

  isTable = v: builtins.isAttrs v && !(isDerivation v);

  # Scalars (and arrays) of a table first, then its sub-tables, as TOML requires.
  # null values are left out (TOML has no null).
  toTOML = attrs:
    let
      go = path: t:
        let
          scalars = filterAttrs (_: v: v != null && !(isTable v)) t;
          tables = filterAttrs (_: v: isTable v) t;
          header = optionalString (path != [ ])
            "[${concatMapStringsSep "." tomlKey path}]\n";
        in
        header
        + concatStrings (mapAttrsToList (k: v: "${tomlKey k} = ${tomlValue v}\n") scalars)
        + concatStrings (mapAttrsToList (k: v: "\n" + go (path ++ [ k ]) v) tables);
    in
    go [ ] attrs;

  # Freeform TOML value type for `settings` options.
  tomlValueType = with lib.types;
    let
      valueType = nullOr (oneOf [ bool int float str (listOf valueType) (attrsOf valueType) ]) // {
        description = "TOML value";
      };
    in
    valueType;
}
