module {{name}}

go 1.26

require mqplug/sdk v0.0.0

// mqplug's Go SDK (plugins/go/sdk in a checkout of mqplug).
replace mqplug/sdk => {{sdk}}
