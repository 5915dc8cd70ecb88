// The handler this plugin exports: the function given to mqplug.Handle.
// Copied here by ../../../../generate.sh; edit it there.

package export_mqplug_plugin_handler

import (
	witRuntime "mqplug/sdk/internal/witgo/runtime"
	types "mqplug/sdk/internal/witgo/types"
	"mqplug/sdk/wit/imports/mqplug_plugin_types"
)

// Handler is set by mqplug.Handle.
var Handler func(mqplug_plugin_types.TaskEvent, mqplug_plugin_types.Delivery) types.Result[types.Unit, mqplug_plugin_types.HandlerError]

func Handle(event mqplug_plugin_types.TaskEvent, delivery mqplug_plugin_types.Delivery) types.Result[types.Unit, mqplug_plugin_types.HandlerError] {
	if Handler == nil {
		return types.Err[types.Unit](mqplug_plugin_types.MakeHandlerErrorRetry(
			"the plugin registered no handler: call mqplug.Handle in an init function"))
	}
	// Collection is on only while the handler runs: the host lowered this
	// event's arguments with it off, and lowers the next one's after we
	// return.
	witRuntime.ResumeGC()
	result := Handler(event, delivery)
	witRuntime.PauseGC()
	return result
}
